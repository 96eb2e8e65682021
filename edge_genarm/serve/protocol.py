"""OpenAI's wire format: request bodies in, scheduler requests out, response bodies and chunks back.

Contract:
- `parse(kind, raw)` validates a JSON body (bytes) for "chat" or "completion" and returns its
  pydantic model. Malformed JSON, a wrong type or an out-of-range value raises `ApiError` 400
  with `param` naming the field. Fields that would change the result and are not implemented
  (`UNSUPPORTED`) are refused by name; other unknown fields are ignored.
- `call_options(body)` names a body's request options as the Python API does (sampling, seed,
  stops, max tokens, ARM alphas, n, log-probs, method); `GenerationOptions.call` puts them
  over the server's options into a scheduler `Request`, the same step as for the API.
- One choice's events are gathered by `generation.Answer` (the output processor's, as for the
  Python API); the builders here turn answers into plain dicts in OpenAI's shapes, with the ARM
  alphas and seed used as extension fields.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..policy import METHODS
from ..speculative import DRAFTERS
from ..generation import Answer
from ..scheduler import TokenLogprob

MAX_STOPS = 16
# The scheduler's reasons, as OpenAI names them: a stop string is a stop, a full context a length.
FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "context_full": "length",
          "cancelled": "stop", "interrupted": "stop"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


# -- request bodies ----------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Common(_Body):
    model: str | None = None
    # Types only: the values are checked with the request (policy.py), as for every caller.
    max_tokens: int | None = Field(None, ge=1)      # 0 is not "none" here, as at OpenAI
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                        # extension
    min_p: float | None = None                      # extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # extensions, llama-server's names: DRY, a penalty on repeating the answer's own text
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    arms: dict[str, float] | None = None            # extension: ARM weights by name
    # extensions: guidance by the server's reward model over the base's top candidates
    method: Literal[METHODS] | None = None
    reward_weight: float | None = None
    candidates: int | None = None
    samples: int | None = None
    # extension: exact speculative decoding (drafts checked in one decode)
    speculative: Literal[("off",) + DRAFTERS] | None = None
    draft_tokens: int | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {}, "none", "auto")


# Fields that change the answer and are not implemented: refused, never silently dropped.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": _off, "tool_choice": _off, "functions": _off, "function_call": _off,
    "logit_bias": _off,
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "repeat_penalty": lambda v: v in (None, 1, 1.0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": _off, "prediction": _off, "web_search_options": _off,
    "modalities": lambda v: v in (None, ["text"]),
    "echo": _off, "suffix": _off, "best_of": lambda v: v in (None, 1),
    "grammar": _off, "json_schema": _off,
}


def parse(kind: str, raw: bytes) -> ChatBody | CompletionBody:
    model = ChatBody if kind == "chat" else CompletionBody
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    refused = [name for name, harmless in UNSUPPORTED.items()
               if name in (body.model_extra or {}) and not harmless(body.model_extra[name])]
    if refused:
        raise ApiError(400, f"{', '.join(refused)}: not supported by this server (edge-genarm); "
                       "remove " + ("it" if len(refused) == 1 else "them"), param=refused[0],
                       code="unsupported_parameter")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if kind == "completion" and isinstance(body.prompt, list) and not body.prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return body


def _validation_error(exc: ValidationError) -> ApiError:
    # the deepest error: of a union's branches, the one that got furthest into the value
    err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
    if err["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({err['msg']}); send a JSON object",
                        code="invalid_json")
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("str", "list[", "function-"))]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return ApiError(400, f"{param} is required", param, "missing_required_parameter")
    got = f" (got {json.dumps(err['input'])[:80]})" if "input" in err and loc else ""
    return ApiError(400, f"{param or 'the body'}: {err['msg'][:1].lower()}{err['msg'][1:]}{got}",
                    param, "invalid_value")


# -- the body as scheduler settings --------------------------------------------------------------
def call_options(body: ChatBody | CompletionBody) -> dict:
    """A body's request options by the Python API's names (None: not given, the server's own
    apply); `GenerationOptions.call` turns them into the request, as for the Python API."""
    given = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "dry_multiplier", "dry_base", "dry_allowed_length", "seed", "stop", "method",
        "reward_weight", "candidates", "samples", "speculative", "draft_tokens")}
    if body.dry_sequence_breakers is not None:
        given["dry_sequence_breakers"] = tuple(body.dry_sequence_breakers)
    given["max_tokens"] = getattr(body, "max_completion_tokens", None) or body.max_tokens or None
    if isinstance(body, ChatBody):
        given["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    else:
        given["logprobs"] = body.logprobs
    return given | {"arms": dict(body.arms or {}), "n": body.n}


# -- answers and responses ---------------------------------------------------------------------
def finish_reason(answer: Answer) -> str | None:
    """OpenAI's finish reason of an answer that has ended (None before)."""
    return FINISH.get(answer.usage.finish_reason) if answer.usage else None


def usage_body(answers: list[Answer], n: int) -> dict:
    """Prompt tokens once per prompt (answer 0 of each), completion tokens of every answer;
    speculative draft tokens kept and rejected under OpenAI's names for predicted outputs."""
    firsts = [a.usage for a in answers if a.index % n == 0 and a.usage]
    prompt = sum(u.prompt_tokens for u in firsts)
    used = [a.usage for a in answers if a.usage]
    completion = sum(u.completion_tokens for u in used)
    accepted = sum(u.accepted_tokens for u in used)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in firsts)},
            "completion_tokens_details": {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": sum(u.drafted_tokens for u in used) - accepted}}


def token_entry(token_bytes: Callable[[int], bytes], token: int, logprob: float) -> dict:
    raw = token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(raw)}


def chat_logprobs(token_bytes, items: list[TokenLogprob]) -> dict:
    return {"content": [token_entry(token_bytes, t.token, t.logprob) | {
        "top_logprobs": [token_entry(token_bytes, i, v) for i, v in t.top]} for t in items]}


def completion_logprobs(token_bytes, items: list[TokenLogprob], offset: int = 0) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in items:
        text = token_bytes(t.token).decode("utf-8", errors="replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({token_bytes(i).decode("utf-8", errors="replace"): v
                                    for i, v in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out

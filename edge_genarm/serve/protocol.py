"""OpenAI's wire format: request bodies in, scheduler requests out, response bodies and chunks back.

Contract:
- `parse(kind, raw)` validates a JSON body (bytes) for "chat" or "completion" and returns its
  pydantic model. Malformed JSON, a wrong type or an out-of-range value raises `ApiError` 400
  with `param` naming the field. Fields that would change the result and are not implemented
  (`UNSUPPORTED`) are refused by name; other unknown fields are ignored.
- The bodies' request options are generated from `config.RequestParams` (every option whose
  declaration says it travels on the wire); `call_options(body)` names them as the Python API
  does, and `options.call` puts them over the server's defaults into the request, the same
  step as for the API.
- One choice's events are gathered by `generation.Answer` (the output processor's, as for the
  Python API); the builders here turn answers into plain dicts in OpenAI's shapes, with the ARM
  alphas and seed used as extension fields.
"""

from __future__ import annotations

import functools
import json
import typing
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .. import fields
from ..config import RequestParams
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


def _wire_type(spec: fields.Spec):
    """An option's type in a JSON body: choices as a Literal, lists as JSON arrays (a single
    string too, for the string lists: stop), every field optional (the server's defaults)."""
    tp = spec.base_type
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if spec.option.choices:
        tp = Literal[spec.option.choices]
    elif origin is tuple:
        tp = str | list[str] if args[0] is str else list[args[0]]
    return tp | None


@functools.cache
def body_models(request_cls: type = RequestParams) -> tuple[type, type]:
    """(ChatBody, CompletionBody) for a request class: its options that travel on the wire
    (generated, OpenAI's names where OpenAI has the option, the rest extensions) beside the
    wire's own fields. Types only: values are checked with the request
    (`RequestParams.validate`), as for every caller."""
    common = create_model(
        "_Common", __base__=_Body, model=(str | None, None),
        stream=(bool, False), stream_options=(StreamOptions | None, None),
        **{s.name: (_wire_type(s), None) for s in fields.specs(request_cls) if s.option.wire})

    class ChatBody(common):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)      # 0 is not "none" here, as at OpenAI
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = None

    class CompletionBody(common):
        prompt: str | list[str] | list[int] | list[list[int]]
        max_tokens: int | None = Field(None, ge=1)

    return ChatBody, CompletionBody


ChatBody, CompletionBody = body_models()


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


def parse(kind: str, raw: bytes, request_cls: type = RequestParams):
    """A body of `kind` for a request class (the loaded model's), validated."""
    chat, completion = body_models(request_cls)
    model = chat if kind == "chat" else completion
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
def call_options(body, request_cls: type = RequestParams) -> dict:
    """A body's request options by their declared names (None: not given, the server's own
    apply); `options.call` turns them into the request, as for the Python API."""
    given = {s.name: getattr(body, s.name) for s in fields.specs(request_cls)
             if s.option.wire}
    given["max_tokens"] = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if hasattr(body, "messages"):  # OpenAI's chat spells log-probs as a flag and a count
        given["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    return given


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

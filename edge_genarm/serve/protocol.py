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
- Structured answers: `response_format` (text, json_object, json_schema) becomes the request's
  `json_schema`, beside llama-server's own `json_schema`, `grammar`, `regex` and `choice`
  fields; at most one of them per request (two: 400 naming the second). `logit_bias` takes
  OpenAI's object {"token id": bias} and llama-server's list [[token id or text, bias]] (a bias
  of false bans the token). Tools (`tools`, `tool_choice`, `parallel_tool_calls`) are chat
  only; `tools.plan` turns them into the request's grammar.
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


class FunctionCall(_Body):
    name: str
    arguments: str | dict = "{}"   # OpenAI sends JSON text; a mapping is taken too


class ToolCall(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None   # an assistant's calls, earlier in the chat
    tool_call_id: str | None = None            # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """The message as the chat template and `templates.tool_history` take it."""
        out: dict = {"role": "system" if self.role == "developer" else self.role,
                     "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        out |= {k: v for k in ("tool_call_id", "name") if (v := getattr(self, k)) is not None}
        return out


# Options whose wire form is wider than their type: turned into it by `call_options`.
WIRE_TYPES = {"logit_bias": dict[str, float | bool] | list[list[int | float | bool | str]]}


def _wire_type(spec: fields.Spec):
    """An option's type in a JSON body: choices as a Literal, lists as JSON arrays (a single
    string too, for the string lists: stop), every field optional (the server's defaults)."""
    tp = spec.base_type
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if spec.name in WIRE_TYPES:
        return WIRE_TYPES[spec.name] | None
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
        tools: list[dict] | None = None     # checked by tools.plan, which names the field
        tool_choice: str | dict | None = None
        parallel_tool_calls: bool | None = None
        response_format: dict | None = None
        max_tokens: int | None = Field(None, ge=1)      # 0 is not "none" here, as at OpenAI
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = None

    class CompletionBody(common):
        prompt: str | list[str] | list[int] | list[list[int]]
        response_format: dict | None = None
        max_tokens: int | None = Field(None, ge=1)

    return ChatBody, CompletionBody


ChatBody, CompletionBody = body_models()


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {}, "none", "auto")


# Fields that change the answer and are not implemented: refused, never silently dropped.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": _off, "function_call": _off,
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "repeat_penalty": lambda v: v in (None, 1, 1.0),
    "audio": _off, "prediction": _off, "web_search_options": _off,
    "modalities": lambda v: v in (None, ["text"]),
    "echo": _off, "suffix": _off, "best_of": lambda v: v in (None, 1),
}
# Chat's own fields, refused on /v1/completions (a prompt has no turns to call tools from).
CHAT_ONLY: dict[str, Callable[[Any], bool]] = {"tools": lambda v: v in (None, []),
                                                "tool_choice": _off}


def parse(kind: str, raw: bytes, request_cls: type = RequestParams):
    """A body of `kind` for a request class (the loaded model's), validated."""
    chat, completion = body_models(request_cls)
    model = chat if kind == "chat" else completion
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    extra = body.model_extra or {}
    refused = [name for name, harmless in UNSUPPORTED.items()
               if name in extra and not harmless(extra[name])]
    if refused:
        raise ApiError(400, f"{', '.join(refused)}: not supported by this server (edge-genarm); "
                       "remove " + ("it" if len(refused) == 1 else "them"), param=refused[0],
                       code="unsupported_parameter")
    chat_only = [name for name, harmless in CHAT_ONLY.items()
                 if kind == "completion" and name in extra and not harmless(extra[name])]
    if chat_only:
        raise ApiError(400, f"{chat_only[0]} is for /v1/chat/completions only: a completion "
                       "cannot call tools", chat_only[0], "unsupported_parameter")
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
def call_options(body, request_cls: type = RequestParams,
                 tokenize: Callable[[str], list[int]] | None = None) -> dict:
    """A body's request options by their declared names (None: not given, the server's own
    apply); `options.call` turns them into the request, as for the Python API. `tokenize`
    reads the text entries of llama-server's logit_bias list."""
    given = {s.name: getattr(body, s.name) for s in fields.specs(request_cls)
             if s.option.wire}
    given["max_tokens"] = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if hasattr(body, "messages"):  # OpenAI's chat spells log-probs as a flag and a count
        given["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    if "logit_bias" in given:
        given["logit_bias"] = logit_bias(given["logit_bias"], tokenize)
    schema = response_schema(getattr(body, "response_format", None))
    if schema is not None:
        taken = [n for n in CONSTRAINTS if given.get(n)]
        if taken:
            raise ApiError(400, f"response_format and {taken[0]} each constrain the answer: "
                           "give one", "response_format", "invalid_value")
        given["json_schema"] = schema
    return given


CONSTRAINTS = ("json_schema", "grammar", "regex", "choice")
_FORMATS = "text, json_object or json_schema"


def response_schema(value: dict | None) -> dict | None:
    """The JSON Schema a response_format asks for (None: free text). OpenAI's json_object and
    json_schema {"name", "schema", "strict"}, and llama-server's json_object with "schema"."""
    if value is None or value.get("type") == "text":
        return None
    kind = value.get("type")
    if kind == "json_object":
        schema = value.get("schema", {"type": "object"})
        where = "response_format.schema"
    elif kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, 'response_format.json_schema is required with type '
                           '"json_schema": {"name": ..., "schema": {...}}',
                           "response_format", "invalid_value")
        # OpenAI's schema is optional: without one, any JSON object
        schema, where = spec.get("schema", {"type": "object"}), \
            "response_format.json_schema.schema"
    else:
        raise ApiError(400, f"response_format.type must be {_FORMATS}, got "
                       f"{json.dumps(kind)[:40]}", "response_format", "invalid_value")
    if not isinstance(schema, dict):
        raise ApiError(400, f"{where} must be a JSON Schema object", "response_format",
                       "invalid_value")
    return schema


def logit_bias(value, tokenize: Callable[[str], list[int]] | None) -> dict | None:
    """OpenAI's {"token id": bias}, or llama-server's [[token id or text, bias]], as
    {"token id": bias}; a bias of false bans (-100), true is refused as meaningless."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    out: dict[str, float] = {}
    for pair in pairs:
        if not isinstance(value, dict) and len(pair) != 2:
            raise ApiError(400, "logit_bias: each entry of the list form is [token id or "
                           f"text, bias], got {json.dumps(pair)[:60]}", "logit_bias",
                           "invalid_value")
        token, bias = pair
        if bias is True or isinstance(bias, str) or isinstance(token, (bool, float)):
            raise ApiError(400, f"logit_bias {json.dumps(list(pair))[:60]}: a token id (or "
                           "text) and a bias number, or false to ban it", "logit_bias",
                           "invalid_value")
        bias = -100.0 if bias is False else float(bias)
        ids = [token] if isinstance(token, int) or isinstance(value, dict) else \
            (tokenize(token) if tokenize else [])
        for t in ids:
            out[str(t)] = bias
    return out


# -- answers and responses ---------------------------------------------------------------------
def finish_reason(answer: Answer) -> str | None:
    """OpenAI's finish reason of an answer that has ended (None before)."""
    return FINISH.get(answer.usage.finish_reason) if answer.usage else None


def usage_body(answers: list[Answer], n: int) -> dict:
    """Prompt tokens once per prompt (answer 0 of each), completion tokens of every answer;
    speculative draft tokens kept and rejected under OpenAI's names for predicted outputs; and,
    beyond OpenAI's fields, the tokens decoded for the answers (best-of-n's and search's
    every candidate: the compute they took)."""
    firsts = [a.usage for a in answers if a.index % n == 0 and a.usage]
    prompt = sum(u.prompt_tokens for u in firsts)
    used = [a.usage for a in answers if a.usage]
    completion = sum(u.completion_tokens for u in used)
    accepted = sum(u.accepted_tokens for u in used)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "decoded_tokens": sum(u.decoded_tokens for u in used),
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

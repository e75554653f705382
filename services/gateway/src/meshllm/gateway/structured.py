"""What the model must write: grammars for structured output and forced tool calls
(pure functions).

`response_format` json_schema / json_object becomes a JSON_SCHEMA grammar (the schema as
given). `tool_choice` required or a named function becomes a LARK grammar (llguidance's
dialect, which embeds JSON schemas with `%json`): one `<tool_call>` block per call, its JSON
{"name": <one of the tools>, "arguments": <that tool's parameters>}, one block or up to
MAX_PARALLEL_CALLS with parallel calls. The engine compiles and enforces both; the gateway
only checks that schemas are valid JSON schemas, so it needs no grammar library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from meshllm.common.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from meshllm.common.types import Grammar, GrammarKind
from meshllm.gateway.errors import invalid

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_PARALLEL_CALLS = 16
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}
# JSON inside the LARK grammars built here is written in one layout (llguidance's
# `x-guidance` options), the one json.dumps and the tool instruction show: a small model
# left free to add whitespace between tokens of JSON fills its whole answer with newlines.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # the JSON schema of the arguments object

    def to_json(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: str       # none | auto | required | function
    name: str = ""  # mode function: the tool that must be called


def check_schema(schema: Any, param: str) -> Mapping[str, Any]:
    """`schema` if it is a valid JSON schema (by its own meta-schema), else a 400."""
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON schema object", param)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise invalid(f"{param} is not a valid JSON schema: {exc.message} (at {where})",
                      param) from exc
    return schema


def json_schema_spec(spec: Any, param: str) -> Mapping[str, Any]:
    """The schema of a json_schema format ({name, schema, strict, description}) at `param`."""
    if not isinstance(spec, dict):
        raise invalid(f"{param} must be an object with name and schema", param)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(f"{param}.name must be 1 to 64 letters, digits, _ or -", f"{param}.name")
    if spec.get("strict") not in (None, True, False):
        raise invalid(f"{param}.strict must be a boolean", f"{param}.strict")
    if not isinstance(spec.get("description", ""), str):
        raise invalid(f"{param}.description must be a string", f"{param}.description")
    if spec.get("schema") is None:
        return ANY_OBJECT
    return check_schema(spec["schema"], f"{param}.schema")


def response_format_schema(value: Any) -> Mapping[str, Any] | None:
    """The schema the answer must match, from `response_format` (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        return json_schema_spec(value.get("json_schema"), "response_format.json_schema")
    raise invalid("response_format.type must be text, json_object or json_schema",
                  "response_format.type" if isinstance(value, dict) else "response_format")


def laid_out(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` with the one JSON layout, unless it chooses its own."""
    return {"x-guidance": LAYOUT, **schema} if "x-guidance" not in schema else dict(schema)


def closed(schema: Any) -> Any:
    """`schema` with objects that list their properties closed to others, unless they say.

    JSON Schema allows any further property by default, and a small model then invents
    keys until max_tokens ("humidity", "feels_like", ...). Every output of the closed
    schema is valid against the schema as given; llama.cpp's converter makes the same
    choice.
    """
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def schema_grammar(schema: Mapping[str, Any]) -> Grammar:
    """The schema, closed: the engine decides the whitespace JSON_SCHEMA grammars allow."""
    return Grammar(GrammarKind.JSON_SCHEMA, json.dumps(closed(schema), ensure_ascii=False))


def _rebased(schema: Any, prefix: str) -> Any:
    """`schema` with its local references ("#...") pointing under `prefix`, for a schema
    that moves from the top of a document into it."""
    if isinstance(schema, dict):
        return {k: prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else _rebased(v, prefix) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v, prefix) for v in schema]
    return schema


def _call_schema(tools: Sequence[FunctionTool]) -> dict[str, Any]:
    """One call to any of `tools`: {"name": const, "arguments": its parameters}."""
    options, defs = [], {}
    for i, tool in enumerate(tools):
        key = f"tool{i}"  # each tool's parameters live in $defs, so their own $refs resolve
        defs[key] = _rebased(closed(dict(tool.parameters)), f"#/$defs/{key}")
        options.append({"type": "object", "additionalProperties": False,
                        "properties": {"name": {"const": tool.name},
                                       "arguments": {"$ref": f"#/$defs/{key}"}},
                        "required": ["name", "arguments"]})
    return {"x-guidance": LAYOUT, "anyOf": options, "$defs": defs}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def tool_call_grammar(tools: Sequence[FunctionTool], parallel: bool,
                      answer: Mapping[str, Any] | None = None) -> Grammar:
    """Calls to `tools` (one, or 1..MAX_PARALLEL_CALLS when parallel); with `answer`, the
    output may instead be a JSON value matching that schema."""
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    lines = [
        "%llguidance {}",
        "start: calls | answer" if answer is not None else "start: calls",
        f"calls: call{more}",
        f"call: {_lark_string(TOOL_CALL_OPEN + chr(10))} call_json "
        f"{_lark_string(chr(10) + TOOL_CALL_CLOSE)}",
        f"call_json: %json {json.dumps(_call_schema(tools), ensure_ascii=False)}",
    ]
    if answer is not None:
        lines.append(f"answer: %json {json.dumps(laid_out(closed(answer)), ensure_ascii=False)}")
    return Grammar(GrammarKind.LARK, "\n".join(lines) + "\n")


def output_grammar(tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool,
                   answer: Mapping[str, Any] | None) -> Grammar | None:
    """The constraint on a chat answer, from its tools, tool_choice and response_format."""
    if choice.mode == "none" or not tools:
        return schema_grammar(answer) if answer is not None else None
    if choice.mode == "auto":  # the model chooses; its calls are parsed from what it writes
        return tool_call_grammar(tools, parallel, answer) if answer is not None else None
    if choice.mode == "required":
        return tool_call_grammar(tools, parallel)
    # A named function is forced: one call to it, as OpenAI answers such a request.
    return tool_call_grammar([t for t in tools if t.name == choice.name], parallel=False)

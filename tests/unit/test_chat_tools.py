"""Chat prompts with tools: a template that reads `tools`, and the family fallback."""

from __future__ import annotations

import json

import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.types import ChatMessage, ToolCall
from meshllm.worker.engine.batch.chat import render_chat, template_for

TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}])
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
ROUND_TRIP = [ChatMessage("user", "Weather in Paris?"),
              ChatMessage("assistant", "", (CALL,)),
              ChatMessage("tool", "18C", tool_call_id="call_1", name="get_weather"),
              ChatMessage("tool", "sunny", tool_call_id="call_2")]
# A minimal tool-aware template in the Hugging Face convention (as Qwen's reads them).
HF_TEMPLATE = (
    "{% if tools %}[tools]{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<{{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments.city }}>{% endfor %}"
    "{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}{% endfor %}")


def test_gemma_gets_the_instruction_and_text_turns() -> None:
    prompt = render_chat(template_for(None, "gemma3"), ROUND_TRIP, "<bos>", "<eos>", TOOLS)
    turns = prompt.split("<start_of_turn>")
    assert turns[0] == "<bos>"
    assert turns[1].startswith("user\n# Tools\n") and '"name": "get_weather"' in turns[1]
    assert turns[1].endswith("Weather in Paris?<end_of_turn>\n")
    assert turns[2] == ('model\n<tool_call>\n{"name": "get_weather", "arguments": '
                        '{"city": "Paris"}}\n</tool_call><end_of_turn>\n')
    assert turns[3] == ("user\n<tool_response>\n18C\n</tool_response>\n"
                        "<tool_response>\nsunny\n</tool_response><end_of_turn>\n")
    assert turns[4] == "model\n" and len(turns) == 5


def test_instruction_joins_an_existing_system_text() -> None:
    messages = [ChatMessage("developer", "Be brief."), ChatMessage("user", "Hi")]
    prompt = render_chat(template_for(None, "llama"), messages, "", "", TOOLS)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert prompt.count("<|im_start|>system") == 1


def test_no_tools_no_instruction() -> None:
    prompt = render_chat(template_for(None, "gemma3"), ROUND_TRIP[:1], "", "")
    assert prompt == "<start_of_turn>user\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n"


def test_a_template_that_reads_tools_gets_them() -> None:
    template = template_for(HF_TEMPLATE, "qwen2")
    assert template.reads_tools
    prompt = render_chat(template, ROUND_TRIP[:3], "", "", TOOLS)
    assert prompt == ("[tools]get_weather;[user]Weather in Paris?"
                      "[assistant]<call_1 get_weather Paris>[tool]18C(call_1)")


def test_a_gguf_template_without_tools_gets_the_fallback() -> None:
    template = template_for("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
                            "qwen2")
    assert not template.reads_tools
    prompt = render_chat(template, ROUND_TRIP[:3], "", "", TOOLS)
    assert prompt.startswith("[system]# Tools")
    assert "[assistant]<tool_call>" in prompt and "[user]<tool_response>\n18C" in prompt


def test_only_assistant_turns_call_tools() -> None:
    with pytest.raises(InvalidGenerateRequest) as info:
        render_chat(template_for(None, "gemma3"), [ChatMessage("user", "x", (CALL,))], "", "")
    assert info.value.param == "messages[0].tool_calls"


@pytest.mark.parametrize("tools_json", ["[not json", '{"a": 1}', "[1]"])
def test_bad_tools_are_request_errors(tools_json: str) -> None:
    with pytest.raises(InvalidGenerateRequest) as info:
        render_chat(template_for(None, "gemma3"), ROUND_TRIP[:1], "", "", tools_json)
    assert info.value.param == "tools"

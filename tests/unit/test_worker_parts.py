"""Pure parts of the worker: stop strings, chat templates, GGUF metadata."""

from __future__ import annotations

import pytest
from meshllm.common import models
from meshllm.common.errors import InvalidGenerateRequest, ModelSourceError
from meshllm.common.gguf import read_header
from meshllm.common.types import ChatMessage
from meshllm.worker.engine.batch.chat import render_chat, template_for
from meshllm.worker.engine.batch.stops import StopMatcher


@pytest.mark.parametrize(("stops", "pieces", "sent", "stopped"), [
    ([], ["a", "b"], "ab", False),
    (["\n"], ["ab", "c\nd"], "abc", True),
    (["END"], ["xE", "N", "D!"], "x", True),
    (["END"], ["xE", "N", "o"], "xENo", False),
    (["ab", "b"], ["xab"], "x", True),
    (["<end>"], ["a<e", "nd>"], "a", True),
], ids=["no stops", "newline", "split across pieces", "false alarm", "earliest wins", "tag"])
def test_stop_matcher(stops: list[str], pieces: list[str], sent: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (sent, stopped)


def test_gemma_template_folds_system_into_first_user_turn() -> None:
    prompt = render_chat(template_for(None, "gemma3"), [
        ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello"), ChatMessage("user", "Bye")], "<bos>", "<eos>")
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                      "<start_of_turn>model\nHello<end_of_turn>\n"
                      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_gguf_template_wins_over_family() -> None:
    template = template_for("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
                            "gemma3")
    assert render_chat(template, [ChatMessage("user", "x")], "", "") == "[user]x"


def test_template_errors_are_request_errors() -> None:
    template = template_for("{{ raise_exception('no system role') }}", "llama")
    with pytest.raises(InvalidGenerateRequest, match="no system role"):
        render_chat(template, [ChatMessage("user", "x")], "", "")
    with pytest.raises(InvalidGenerateRequest, match="role"):
        render_chat(template_for(None, "llama"), [ChatMessage("robot", "x")], "", "")


def test_catalog_model_header() -> None:
    spec = models.describe("gemma3-270m", 4096)
    assert (spec.model_id, spec.architecture, spec.n_layers) == ("gemma3-270m", "gemma3", 18)
    assert spec.train_context_length == 32768 and spec.context_length == 4096
    # one KV head of 256 for K and V, f16, 18 layers
    assert spec.kv_bytes_per_token == 18 * 1 * (256 + 256) * 2
    header = read_header(models.materialize("gemma3-270m"))
    assert header.array_lengths["tokenizer.ggml.tokens"] == 262144


def test_bad_sources(tmp_path: object) -> None:
    with pytest.raises(ModelSourceError, match="neither a known name"):
        models.materialize("/no/such/model.gguf")
    assert models.model_id_for("/x/My Model-Q4.gguf") == "my-model-q4"

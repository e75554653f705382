"""`--chat-template`: the planner's override reaches the engine and changes the prompt."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from meshllm.common.types import ChatMessage
from meshllm.worker.engine.batch import chat

from tests.support.mesh import LocalMesh, MeshOptions

pytestmark = pytest.mark.integration
MESSAGES = [ChatMessage("system", "Answer briefly."), ChatMessage("user", "Name a colour.")]


@pytest.fixture(scope="module")
def chatml_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path_factory.mktemp("chatml"), MeshOptions(
        workers=1, planner_args=("--chat-template", "gemma3-270m=chatml")))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def _prompt_tokens(client: openai.OpenAI, prompt: str) -> int:
    done = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=1,
                                     temperature=0.0)
    assert done.usage is not None
    return done.usage.prompt_tokens


def test_chatml_override_renders_the_chat_as_chatml(chatml_mesh: LocalMesh) -> None:
    client = openai.OpenAI(base_url=chatml_mesh.base_url + "/v1", api_key="unused",
                           max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="gemma3-270m", max_tokens=1, temperature=0.0,
        messages=[{"role": m.role, "content": m.content} for m in MESSAGES])  # type: ignore[misc]
    assert reply.usage is not None
    # The same messages as text, rendered by each template: the chat's prompt is ChatML's.
    as_chatml = chat.render_chat(chat.choose_template("name:chatml", None, "gemma3")[0],
                                 MESSAGES, "", "")
    as_gemma = chat.render_chat(chat.template_for(None, "gemma3"), MESSAGES, "", "")
    chatml_tokens, gemma_tokens = (_prompt_tokens(client, p) for p in (as_chatml, as_gemma))
    assert chatml_tokens != gemma_tokens
    assert reply.usage.prompt_tokens == chatml_tokens
    assert "chat template: override chatml" in chatml_mesh.logs()

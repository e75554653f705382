"""A first session with one `mesh-llm up`, as a newcomer has it: `up --open` where there is
no browser, the README's quick start, `mesh-llm chat` in a terminal, the console's empty
blackboard, then SIGTERM stops every process, the workers' engines included. One mesh for
the whole module (its last test stops it)."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from meshllm.cli.procs import STOP_GRACE_S

from tests.integration.up_process import (
    MESH_LLM,
    UpProcess,
    command_of,
    holds_model,
    still_alive,
)
from tests.observability.cdp import Browser

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
USAGE = r"\(last reply: (\d+) prompt tokens, (\d+) completion tokens; (\d+) turns? kept\)"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    mesh = UpProcess(tmp_path_factory.mktemp("up"), "--worker-memory", "1GiB", "--open")
    try:
        mesh.wait_for("Ready: http://localhost", 300)
        yield mesh
    finally:
        mesh.kill_everything()


def test_open_without_a_display_says_where_the_console_is(up: UpProcess) -> None:
    line = f"no browser here (no display): open http://localhost:{up.port}/console"
    assert line in up.wait_for(line, 10)


def _chat(up: UpProcess) -> pexpect.spawn[str]:
    # No --url: chat finds the gateway in the record `up` left in its data directory.
    chat = pexpect.spawn(MESH_LLM, ["chat", "--data-dir", str(up.data_dir), "--max-tokens",
                                    "24", "--temperature", "0"], encoding="utf-8", timeout=60)
    chat.expect(f"mesh-llm chat: {MODEL} at http://localhost:{up.port}/v1")
    chat.expect(">>> ")
    return chat


def _turn(chat: pexpect.spawn[str], text: str) -> tuple[str, float, float]:
    """The reply to `text`, when its first character came and when it ended."""
    chat.sendline(text)
    chat.expect_exact(text + "\r\n")  # the terminal's echo
    chat.expect(r"\S")
    first = time.monotonic()
    start = str(chat.after)
    chat.expect(">>> ")
    return start + str(chat.before), first, time.monotonic()


def _usage(chat: pexpect.spawn[str]) -> tuple[int, int, int]:
    chat.sendline("/usage")
    chat.expect(USAGE)
    assert isinstance(chat.match, re.Match)
    prompt, completion, turns = (int(g) for g in chat.match.groups())
    chat.expect(">>> ")
    return prompt, completion, turns


def test_chat_streams_replies_and_keeps_the_history(up: UpProcess) -> None:
    chat = _chat(up)
    try:
        reply, first, end = _turn(chat, "Monday, Tuesday, Wednesday,")
        assert reply.strip()
        assert end - first > 0.05  # text showed while the reply was still coming
        prompt_1, completion_1, turns = _usage(chat)
        assert turns == 1 and completion_1 > 0
        _turn(chat, "Thursday?")
        prompt_2, _, turns = _usage(chat)
        assert turns == 2
        # the second request carried the first turn: its question, the reply, its own
        assert prompt_2 > prompt_1 + completion_1
        chat.sendline("/reset")
        chat.expect_exact("(conversation forgotten)")
        _turn(chat, "Monday, Tuesday, Wednesday,")
        assert _usage(chat)[0] == prompt_1
        chat.sendline("/model nope")
        chat.expect_exact("(now talking to nope")
        chat.sendline("hello")
        chat.expect("error: 404: .*does not exist")
        chat.sendline(f"/model {MODEL}")
        chat.expect(">>> ")
        # Ctrl-D leaves. A ^D that arrives while readline is still setting the terminal up
        # for the new prompt can be dropped by the line discipline: send it again then.
        for _ in range(5):
            chat.sendeof()
            if chat.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3) == 0:
                break
        else:
            raise AssertionError(f"Ctrl-D did not end the chat: {chat.before!r}")
        chat.close()
        assert chat.exitstatus == 0
    finally:
        chat.close(force=True)


def test_the_console_says_the_board_is_empty_then_shows_a_post(up: UpProcess,
                                                               tmp_path: Path) -> None:
    browser = Browser(tmp_path / "chromium-profile")
    try:
        page = browser.open(up.url + "/console")
        page.wait_for("document.getElementById('board')?.dataset.state === 'empty'")
        assert page.evaluate("document.getElementById('board').textContent") == "no posts yet"
        posted = httpx.post(up.url + "/api/blackboard/posts",
                            json={"author": "test", "text": "first post"})
        assert posted.status_code == 201, posted.text
        page.wait_for("document.getElementById('board')?.dataset.state === 'posts'")
        assert "first post" in page.evaluate("document.getElementById('board').textContent")
    finally:
        browser.close()


README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_examples() -> list[tuple[str, str]]:
    """The README quick start's Python examples, each with the output shown after it."""
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("### Serving a model of your own")]
    return re.findall(r"```python\n(.*?)```\n```\n(.*?)```", section, re.S)


def test_the_readme_quick_start_prints_what_it_shows(up: UpProcess) -> None:
    # As written, but on this mesh's port; one namespace, as in one Python session.
    examples = quick_start_examples()
    assert len(examples) == 2
    namespace: dict[str, object] = {}
    for code, shown in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code.replace(":9337", f":{up.port}"), namespace)
        assert out.getvalue().rstrip() == shown.rstrip(), code


def test_sigterm_stops_every_process_engines_included(up: UpProcess) -> None:
    tree = up.tree()
    engines = [p for p in tree if "meshllm.worker.engine" in command_of(p)]
    # per worker one serving (or still loading) and one started ahead of the next load
    assert 2 <= len(engines) <= 4 and any(holds_model(p) for p in engines), [
        command_of(p) for p in tree]
    up.signal(signal.SIGTERM)
    assert up.popen.wait(STOP_GRACE_S + 10) == 0
    assert "stopping the mesh..." in up.wait_for("stopped")
    assert [command_of(p) for p in still_alive(tree, 2)] == []

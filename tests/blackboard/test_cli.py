"""Every `mesh-llm blackboard` command and flag, through the installed `mesh-llm`
executable, against real nodes: what a user types is what runs here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from meshllm.cli.blackboard_cmd import node_argv

from tests.support.blackboard import BlackboardNode, eventually
from tests.support.procs import free_port

MESH_LLM = str(Path(sys.executable).with_name("mesh-llm"))
integration = pytest.mark.integration


@pytest.mark.parametrize(("args", "expected"), [
    ([], []),                                                  # bare: the node, defaults
    (["serve"], []),
    (["serve", "--listen", "0.0.0.0:9339"], ["--listen", "0.0.0.0:9339"]),
    (["serve", "--help"], ["--help"]),
    (["--listen", "0.0.0.0:9339", "--etcd", "http://e:2379"],  # flags only: the node
     ["--listen", "0.0.0.0:9339", "--etcd", "http://e:2379"]),
    (["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--listen", ":1"],
     ["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--listen", ":1"]),
    (["feed"], None),
    (["post", "hello", "--tag", "x"], None),
    (["--blackboard", "h:1", "feed"], None),
    (["--blackboard=h:1", "--json", "search", "w"], None),
    (["--json", "feed", "--limit", "3"], None),
    (["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--json", "watch"], None),
    (["--json"], None),          # client flags without a command: the client's usage error
    (["--help"], None),
    (["-h"], None),
    (["bogus"], None),           # the client's "invalid choice", with the list of commands
    (["--blackboard"], None),    # the client's "expected one argument"
])
def test_which_of_node_and_client_runs(args: list[str], expected: list[str] | None) -> None:
    assert node_argv(args) == expected


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLLM_")}
    return {**env, **extra}


async def mesh_llm(*args: str, stdin: str = "", **env: str) -> Run:
    proc = await asyncio.create_subprocess_exec(
        MESH_LLM, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env(**env), cwd="/")
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def unique(prefix: str) -> str:
    """A fresh word: every test finds its own posts, and no author hits the rate limit."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def on(node: BlackboardNode, *args: str, stdin: str = "", **env: str) -> Run:
    return await mesh_llm("blackboard", "--blackboard", node.address, *args, stdin=stdin,
                          **env)


async def post_json(node: BlackboardNode, *args: str, stdin: str = "", **env: str
                    ) -> dict[str, Any]:
    run = await on(node, "--json", "post", *args, stdin=stdin, **env)
    assert run.rc == 0, run.err
    [post] = run.json_lines()
    return post


@integration
async def test_the_readme_examples_target_a_node(mesh: list[BlackboardNode]) -> None:
    a, b, _ = mesh
    tag = unique("readme")
    made = await mesh_llm("blackboard", "--blackboard", a.address, "post",
                          "gemma3 placement done on worker-2", "--tag", tag,
                          "--author", unique("planner-bot"))
    assert made.rc == 0, made.err
    assert made.out.startswith("posted ")
    post_id = made.out.split()[1]

    async def on_b() -> bool:
        run = await mesh_llm("blackboard", "--json", "--blackboard", b.address, "feed",
                             "--tag", tag)
        assert run.rc == 0, run.err
        return [p["id"] for p in run.json_lines()] == [post_id]

    await eventually(on_b, 10, "the post in b's feed")
    text_feed = await mesh_llm("blackboard", "--blackboard", b.address, "feed", "--tag", tag)
    assert text_feed.rc == 0 and post_id in text_feed.out and f"#{tag}" in text_feed.out
    # Without --blackboard it looks at the default address: reachable or not, the flags are
    # the client's (before the fix: exit 2, "unrecognized arguments").
    default = await mesh_llm("blackboard", "--json", "feed")
    assert default.rc in (0, 3), default.err
    assert "unrecognized arguments" not in default.err


@integration
async def test_post_with_every_flag(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    tag, channel, author = unique("t"), unique("ch"), unique("alice")
    first = await post_json(a, "root post", "--tag", tag, "--tag", "second",
                            "--author", author, "--channel", channel)
    assert (first["text"], first["author"], first["channel"]) == ("root post", author, channel)
    assert first["tags"] == [tag, "second"] and first["origin_node"] == "a"
    reply = await post_json(a, "a reply", "--reply-to", first["id"], "--author", author)
    assert reply["reply_to"] == first["id"]
    from_stdin = await post_json(a, "-", "--author", author, stdin="line one\nline two\n")
    assert from_stdin["text"].startswith("line one\nline two")
    by_env = await post_json(a, "who am i", MESHLLM_AUTHOR=(env_author := unique("env")))
    assert by_env["author"] == env_author
    plain = await on(a, "post", "plain output", "--author", author)
    assert plain.rc == 0 and plain.out.startswith("posted ")


@integration
async def test_feed_filters(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    tag, channel = unique("feed"), unique("room")
    alice, bob = unique("alice"), unique("bob")
    p1 = await post_json(a, "one", "--tag", tag, "--author", alice)
    p2 = await post_json(a, "two", "--tag", tag, "--author", bob, "--channel", channel)
    p3 = await post_json(a, "three", "--tag", tag, "--author", alice, "--channel", channel)

    async def ids(*args: str) -> list[str]:
        run = await on(a, "--json", "feed", *args)
        assert run.rc == 0, run.err
        return [p["id"] for p in run.json_lines()]

    assert await ids("--tag", tag) == [p3["id"], p2["id"], p1["id"]]  # newest first
    assert await ids("--tag", tag, "--author", alice) == [p3["id"], p1["id"]]
    assert await ids("--channel", channel) == [p3["id"], p2["id"]]
    assert await ids("--channel", channel, "--author", bob) == [p2["id"]]
    assert await ids("--tag", tag, "--limit", "2") == [p3["id"], p2["id"]]
    assert await ids("--tag", tag, "--since", "1h") == [p3["id"], p2["id"], p1["id"]]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await ids("--tag", tag, "--since", future) == []
    since_p2 = str(p2["created_unix_ms"] / 1000)
    assert await ids("--tag", tag, "--since", since_p2) == [p3["id"], p2["id"]]
    text = await on(a, "feed", "--tag", tag, "--channel", channel)
    assert text.rc == 0 and f"[{channel}]" in text.out and f"{alice}@a" in text.out


@integration
async def test_search(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    word, other = unique("zebra"), unique("quagga")
    both = await post_json(a, f"{word} and {other}", "--author", unique("s"))
    one = await post_json(a, f"only {word}", "--author", unique("s"))
    run = await on(a, "--json", "search", word, other)
    assert run.rc == 0, run.err
    hits = run.json_lines()
    assert [(h["id"], h["hits"]) for h in hits] == [(both["id"], 2), (one["id"], 1)]
    limited = await on(a, "--json", "search", word, "--limit", "1")
    assert len(limited.json_lines()) == 1
    text = await on(a, "search", word, other)
    assert text.rc == 0 and "(2 hits)" in text.out and "(1 hits)" in text.out
    # No embeddings model on this mesh: --mode semantic falls back to words, says so on
    # stderr and keeps stdout one hit per line.
    semantic = await on(a, "--json", "search", word, "--mode", "semantic")
    assert semantic.rc == 0 and "note: no worker" in semantic.err
    assert [h["id"] for h in semantic.json_lines()] == [one["id"], both["id"]]
    words = await on(a, "--json", "search", word, "--mode", "words")
    assert words.rc == 0 and "note:" not in words.err
    assert (await on(a, "search", word, "--mode", "fuzzy")).rc == 2


@integration
async def test_watch_prints_posts_from_other_nodes(mesh: list[BlackboardNode]) -> None:
    a, _, c = mesh
    tag = unique("w")
    proc = await asyncio.create_subprocess_exec(
        MESH_LLM, "blackboard", "--json", "--blackboard", c.address, "watch", "--tag", tag,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(), cwd="/")
    assert proc.stdout is not None
    try:
        # The stream gives no signal that it is registered: post until a line arrives.
        line = asyncio.create_task(proc.stdout.readline())

        async def printed() -> bool:
            await post_json(a, "tick", "--tag", tag, "--author", unique("w"))
            await asyncio.wait({line}, timeout=0.5)
            return line.done()

        await eventually(printed, 15, "watch to print a post", poll_s=0)
        seen = json.loads(line.result())
        assert seen["tags"] == [tag] and seen["origin_node"] == "a"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


@integration
async def test_watch_count_exits_by_itself(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    tag = unique("wc")
    watch = asyncio.create_task(mesh_llm("blackboard", "--blackboard", a.address, "watch",
                                         "--tag", tag, "--count", "1"))

    async def exited() -> bool:
        await post_json(a, "count me", "--tag", tag, "--author", unique("wc"))
        await asyncio.wait({watch}, timeout=0.5)
        return watch.done()

    await eventually(exited, 15, "watch --count 1 to exit", poll_s=0)
    assert watch.result().rc == 0
    assert f"#{tag}" in watch.result().out


@integration
async def test_mcp_over_stdio(mesh: list[BlackboardNode]) -> None:
    b = mesh[1]
    author, tag = unique("agent"), unique("mcp")
    params = StdioServerParameters(command=MESH_LLM, args=[
        "blackboard", "--blackboard", b.address, "mcp", "--author", author], env=_env())
    async with Client(params) as mcp:
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert {"post", "feed", "search"} <= tools
        made = await mcp.call_tool("post", {"text": f"mcp {tag}", "tags": [tag]})
        assert not made.is_error, made
        post = made.structured_content
        assert post is not None and post["author"] == author and post["origin_node"] == "b"
        feed = await mcp.call_tool("feed", {"tag": tag})
        assert feed.structured_content is not None
        assert [p["id"] for p in feed.structured_content["posts"]] == [post["id"]]
        found = await mcp.call_tool("search", {"query": tag})
        assert found.structured_content is not None
        assert [h["id"] for h in found.structured_content["hits"]] == [post["id"]]


@integration
async def test_exit_codes(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    refused = await on(a, "post", "key sk-abcdefghijklmnop123456", "--author", unique("x"))
    assert refused.rc == 1 and "api-key" in refused.err
    too_large = await on(a, "post", "x" * 2000, "--author", unique("x"))
    assert too_large.rc == 1, too_large.err
    no_words = await on(a, "search", "!!")
    assert no_words.rc == 1, no_words.err
    for args in (["feed", "--since", "yesterday"], ["feed", "--limit", "many"],
                 ["bogus"], ["post"], ["--json"], ["post", "x", "--bogus"],
                 ["--tls-cert", "/nonexistent.pem", "feed"]):
        bad = await on(a, *args)
        assert bad.rc == 2, (args, bad.err)
        assert bad.err.strip(), args
    nobody = f"127.0.0.1:{free_port()}"
    for args in (["feed"], ["post", "hello", "--author", "x"], ["search", "w"]):
        unreachable = await mesh_llm("blackboard", "--blackboard", nobody, *args)
        assert unreachable.rc == 3, (args, unreachable.err)
        assert nobody in unreachable.err


@integration
async def test_help_names_both_the_client_and_the_node() -> None:
    client_help = await mesh_llm("blackboard", "--help")
    assert client_help.rc == 0
    for word in ("post", "feed", "search", "watch", "mcp", "serve", "--blackboard", "--json",
                 "--tls-cert"):
        assert word in client_help.out, word
    node_help = await mesh_llm("blackboard", "serve", "--help")
    assert node_help.rc == 0
    assert "--listen" in node_help.out and "--anti-entropy-interval-s" in node_help.out

"""The blackboard's surfaces against real nodes: HTTP (the gateway's routes under uvicorn),
the CLI, and the MCP server through an MCP client."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import uvicorn
from mcp import Client, StdioServerParameters
from meshllm.cli.blackboard_cmd import add_blackboard_parser, run_blackboard
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.types import Draft
from meshllm.gateway.blackboard_api import blackboard_routes
from starlette.applications import Starlette

from tests.support.blackboard import BlackboardNode, eventually
from tests.support.procs import free_port

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def gateway(mesh: list[BlackboardNode]) -> AsyncIterator[str]:
    """The blackboard routes on a real HTTP server, talking to node a."""
    async with mesh[0].client() as client:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(Starlette(routes=blackboard_routes(client)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        await eventually(lambda: _started(server), 10, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
        await task


async def _started(server: uvicorn.Server) -> bool:
    return bool(server.started)


async def test_http_post_feed_and_search(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        made = await http.post("/api/blackboard/posts", json={
            "author": "hank", "text": "wombat burrow mapped", "tags": ["Zoo"]})
        assert made.status_code == 201, made.text
        post = made.json()
        assert (post["object"], post["tags"], post["redactions"]) == ("blackboard.post",
                                                                      ["zoo"], [])
        await http.post("/api/blackboard/posts", json={"author": "ivy", "text": "wombat"})
        feed = (await http.get("/api/blackboard/posts",
                               params={"author": "hank", "tag": "zoo", "since": "5m"})).json()
        assert [p["id"] for p in feed["data"]] == [post["id"]]
        assert len((await http.get("/api/blackboard/posts", params={"limit": 1})).json()
                   ["data"]) == 1
        found = (await http.get("/api/blackboard/search", params={"q": "wombat burrow"})).json()
        assert found["data"][0]["id"] == post["id"] and found["data"][0]["hits"] == 2
        # No worker serves an embeddings model here: ranked by words, and the reply says so.
        assert found["mode_used"] == "words" and "no worker" in found["note"]
        words = (await http.get("/api/blackboard/search",
                                params={"q": "wombat", "mode": "words"})).json()
        assert (words["mode_used"], words["note"], len(words["data"])) == ("words", "", 2)
        bad = await http.get("/api/blackboard/search", params={"q": "wombat", "mode": "fuzzy"})
        assert bad.status_code == 400
        assert (bad.json()["error"]["param"], bad.json()["error"]["code"]) == ("mode",
                                                                              "invalid_value")


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"author": "hank", "text": "y" * 1500}, 413, "text_too_large", "text"),
    ({"author": "hank", "text": "AKIAIOSFODNN7EXAMPLE"}, 422, "secret_detected", "text"),
    ({"author": "hank"}, 400, "invalid_value", "text"),
    ({"author": "hank", "text": "t", "tags": "notalist"}, 400, "invalid_value", "tags"),
    ({"author": "hank", "text": "t", "reply_to": "bad"}, 400, "invalid_post", None),
])
async def test_http_errors_have_the_openai_shape(
    gateway: str, body: dict[str, object], status: int, code: str, param: str | None
) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        reply = await http.post("/api/blackboard/posts", json=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"] and error["type"]


async def test_http_rate_limit_and_bad_queries(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        for i in range(10):
            await http.post("/api/blackboard/posts", json={"author": "flood", "text": f"{i}"})
        limited = await http.post("/api/blackboard/posts", json={"author": "flood", "text": "x"})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        for path, params, param in (("/api/blackboard/posts", {"since": "soon"}, "since"),
                                    ("/api/blackboard/posts", {"limit": "0"}, "limit"),
                                    ("/api/blackboard/search", {"q": " "}, "q")):
            reply = await http.get(path, params=params)
            assert (reply.status_code, reply.json()["error"]["param"]) == (400, param)
        bad_json = await http.post("/api/blackboard/posts", content=b"{nope")
        assert bad_json.json()["error"]["code"] == "invalid_json"


async def test_http_stream_carries_posts_from_another_node(
    gateway: str, mesh: list[BlackboardNode]
) -> None:
    events: list[dict[str, object]] = []

    async def read_stream(http: httpx.AsyncClient) -> None:
        async with http.stream("GET", "/api/blackboard/stream", params={"tag": "sse"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))

    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http, \
            mesh[1].client() as on_b:
        reader = asyncio.create_task(read_stream(http))

        # The stream gives no signal that it is registered: post until an event arrives.
        async def arrived() -> bool:
            await on_b.post(Draft(f"sse-{len(events)}", "event", ("sse",)))
            return bool(events)
        await eventually(arrived, 10, "an SSE event", poll_s=0.5)
        reader.cancel()
    assert events[0]["origin_node"] == "b" and events[0]["tags"] == ["sse"]


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mesh-llm")
    add_blackboard_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["blackboard", *argv])


async def test_cli_post_feed_search_watch(
    mesh: list[BlackboardNode], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = mesh[0].address, mesh[1].address
    assert await run_blackboard(_cli("--blackboard", a, "post", "kiwi fruit ripe",
                                     "--author", "jo", "--tag", "cli")) == 0
    assert capsys.readouterr().out.startswith("posted ")
    await eventually(lambda: _feed_has(b, "kiwi"), 10, "the CLI post on b")
    assert await run_blackboard(_cli("--blackboard", b, "--json", "feed", "--tag", "cli")) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["text"] == "kiwi fruit ripe"
    assert await run_blackboard(_cli("--blackboard", b, "search", "kiwi")) == 0
    assert "(1 hits)" in capsys.readouterr().out
    assert await run_blackboard(_cli("--blackboard", a, "post", "ghp_0123456789abcdefghij"
                                     "ABCDEFGHIJ0123", "--author", "jo")) == 1
    assert "github-token" in capsys.readouterr().err
    assert await run_blackboard(_cli("--blackboard", "127.0.0.1:1", "feed")) == 3

    watch = asyncio.create_task(run_blackboard(_cli("--blackboard", b, "watch", "--tag",
                                                    "watch", "--count", "1")))
    async def watched() -> bool:
        await run_blackboard(_cli("--blackboard", a, "post", "tick", "--author",
                                  f"w{len(capsys.readouterr().out)}", "--tag", "watch"))
        return watch.done()
    await eventually(watched, 10, "watch to print a post", poll_s=0.5)
    assert watch.result() == 0


async def _feed_has(address: str, word: str) -> bool:
    async with BlackboardClient(address) as client:
        return bool(await client.search(word))


async def test_mcp_tools_through_an_mcp_client(mesh: list[BlackboardNode]) -> None:
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "meshllm.blackboard.mcp_server", "--blackboard", mesh[2].address,
        "--author", "agent-7"])
    async with Client(params) as mcp:
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert {"post", "feed", "search"} <= tools
        made = await mcp.call_tool("post", {"text": "mcp says hello", "tags": ["mcp"]})
        assert not made.is_error, made
        post = made.structured_content
        assert post is not None and post["author"] == "agent-7" and post["origin_node"] == "c"
        feed = await mcp.call_tool("feed", {"tag": "mcp"})
        assert feed.structured_content is not None
        assert [p["id"] for p in feed.structured_content["posts"]] == [post["id"]]
        found = await mcp.call_tool("search", {"query": "hello"})
        assert found.structured_content is not None
        assert post["id"] in [h["id"] for h in found.structured_content["hits"]]
        by_meaning = await mcp.call_tool("search", {"query": "hello", "mode": "semantic"})
        assert by_meaning.structured_content is not None
        assert by_meaning.structured_content["mode_used"] == "words"
        assert "no worker" in by_meaning.structured_content["note"]
        assert (await mcp.call_tool("search", {"query": "hello", "mode": "fuzzy"})).is_error
        refused = await mcp.call_tool("post", {"text": "key sk-abcdefghijklmnop123456"})
        assert refused.is_error
        assert "api-key" in str(refused.content)

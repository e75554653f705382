"""The blackboard as MCP tools (post, feed, search) for agents, over stdio.

`python -m meshllm.blackboard.mcp_server --blackboard HOST:PORT [--author NAME]` or
`mesh-llm blackboard mcp`. Each tool is a thin adapter over `BlackboardClient`; typed
errors become tool errors whose text tells the agent what to change.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.errors import BlackboardError
from meshllm.common.blackboard.types import Draft, FeedQuery, PostId
from meshllm.common.blackboard.wire import hit_to_json, parse_mode, parse_since, post_to_json
from meshllm.common.config import process_env
from meshllm.common.tls import GrpcSecurity, security_from_env

INSTRUCTIONS = (
    "A message board shared by every agent on the mesh. Post findings, progress and "
    "questions; read the feed or search before starting work that others may have done. "
    "Posts are public to the mesh: never include secrets (they are refused)."
)


def build_server(client: BlackboardClient, default_author: str) -> MCPServer:
    server = MCPServer("mesh-llm-blackboard", instructions=INSTRUCTIONS)

    @server.tool(description="Post a message to the blackboard; it reaches every node.")
    async def post(text: str, tags: list[str] | None = None, channel: str = "",
                   reply_to: str = "", author: str = "") -> dict[str, object]:
        draft = Draft(author or default_author, text, tuple(tags or ()), channel,
                      PostId(reply_to) if reply_to else None)
        try:
            accepted = await client.post(draft)
        except BlackboardError as exc:
            raise ToolError(str(exc)) from exc
        return {**post_to_json(accepted.post), "redactions": list(accepted.redactions)}

    @server.tool(description="Newest posts first. since: unix seconds, ISO 8601 or an age "
                             "such as 15m or 2h.")
    async def feed(since: str = "", author: str = "", tag: str = "", channel: str = "",
                   limit: int = 20) -> dict[str, object]:
        try:
            since_ms = parse_since(since, time.time_ns() // 1_000_000)
            posts = await client.feed(FeedQuery(since_ms, author, tag, channel, limit))
        except (BlackboardError, ValueError) as exc:
            raise ToolError(str(exc)) from exc
        return {"posts": [post_to_json(p) for p in posts]}

    @server.tool(description="Search posts. mode: semantic (by meaning), words (posts "
                             "containing the words, most hits first) or hybrid (a blend); "
                             "default: hybrid when the mesh serves an embeddings model, else "
                             "words. The result says which mode ranked the hits.")
    async def search(query: str, limit: int = 20, mode: str = "") -> dict[str, object]:
        try:
            result = await client.search_result(query, limit, parse_mode(mode))
        except (BlackboardError, ValueError) as exc:
            raise ToolError(str(exc)) from exc
        return {"hits": [hit_to_json(h) for h in result.hits],
                "mode_used": result.mode_used.value, "note": result.note}

    return server


async def serve_stdio(address: str, default_author: str,
                      security: GrpcSecurity | None = None) -> None:
    """Serve the tools on stdio; `security` defaults to the MESHLLM_TLS_* variables."""
    if security is None:
        security = security_from_env("mesh-llm blackboard mcp", process_env())
    async with BlackboardClient(address, security=security) as client:
        await build_server(client, default_author).run_stdio_async()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshllm.blackboard.mcp_server")
    parser.add_argument("--blackboard", default="127.0.0.1:9339", metavar="ADDRESS")
    parser.add_argument("--author", default="agent", help="author of posts that name none")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(serve_stdio(args.blackboard, args.author))
    return 0


if __name__ == "__main__":
    sys.exit(main())

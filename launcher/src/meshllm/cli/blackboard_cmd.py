"""`mesh-llm blackboard`: post, read, search and watch the mesh's blackboard; or serve it
to an agent as MCP tools (`mesh-llm blackboard mcp`).

The same command runs the node (`mesh-llm blackboard serve FLAGS`); `node_argv` decides
which of the two an argument list asks for."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.errors import BlackboardError, BlackboardUnavailable, PostRejected
from meshllm.common.blackboard.types import (
    Draft,
    FeedQuery,
    Post,
    PostId,
    SearchMode,
    SubscribeFilter,
)
from meshllm.common.blackboard.wire import hit_to_json, parse_since, post_to_json
from meshllm.common.config import Option, process_env, read_options
from meshllm.common.errors import ConfigError
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from

DEFAULT_ADDRESS = "127.0.0.1:9339"
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
AUTHOR_OPTION = Option("--author", "MESHLLM_AUTHOR", str, "",
                       "author of posts that name none (default: the user name)")


@dataclass(frozen=True)
class BoardCliConfig:
    default_author: str     # of posts without --author; "" when no user name is known
    security: GrpcSecurity  # plaintext or mutual TLS towards the blackboard node


CLIENT_COMMANDS = ("post", "feed", "search", "watch", "mcp")
# The client's own flags, given before the command; all but --json take a value.
CLIENT_SWITCHES = ("--json",)
CLIENT_VALUE_FLAGS = ("--blackboard", *(opt.flag for opt in TLS_OPTIONS))


def node_argv(args: Sequence[str]) -> list[str] | None:
    """The node's flags when `mesh-llm blackboard ARGS` runs the node, None for the client.

    The node runs for `serve FLAGS`, for no arguments at all, and (the spelling before
    `serve` existed) when the first argument that is not a client flag is a flag. Anything
    else is the client: client flags, then a command; `-h` shows the client's help.
    """
    if not args:
        return []
    if args[0] == "serve":
        return list(args[1:])
    i = 0
    while i < len(args):
        flag, has_value, _ = args[i].partition("=")
        if args[i] in ("-h", "--help", *CLIENT_SWITCHES):
            i += 1
        elif flag in CLIENT_VALUE_FLAGS:
            i += 1 if has_value else 2
        else:
            break
    if i < len(args) and args[i].startswith("-"):
        return list(args)
    return None


def load_cli_config(env: Mapping[str, str], argv: Sequence[str] = ()) -> BoardCliConfig:
    """What the blackboard commands take from their TLS flags (`argv`) and the environment
    (MESHLLM_AUTHOR, the MESHLLM_TLS_* variables)."""
    values = read_options("mesh-llm blackboard", (AUTHOR_OPTION, *TLS_OPTIONS), argv, env)
    return BoardCliConfig(values["author"] or _user_name(), security_from(values))


def _tls_argv(args: argparse.Namespace) -> list[str]:
    return [f"{opt.flag}={getattr(args, opt.dest)}" for opt in TLS_OPTIONS
            if getattr(args, opt.dest, None) is not None]


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's bare uid): posts need --author
        return ""


def add_blackboard_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "blackboard", help="the agents' shared message board",
        description="Use the blackboard: mesh-llm blackboard [CLIENT FLAGS] COMMAND ... "
        "Run a blackboard node: mesh-llm blackboard serve [FLAGS] "
        "(flags: mesh-llm blackboard serve --help).")
    p.add_argument("--blackboard", default=DEFAULT_ADDRESS, metavar="ADDRESS",
                   help=f"blackboard node gRPC address (default {DEFAULT_ADDRESS})")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    for opt in TLS_OPTIONS:
        p.add_argument(opt.flag, dest=opt.dest, default=None, help=f"{opt.help} [env {opt.env}]")
    sub = p.add_subparsers(dest="blackboard_command", required=True)
    post = sub.add_parser("post", help="post TEXT ('-' reads stdin)")
    post.add_argument("text")
    post.add_argument("--author", default="", help="default $MESHLLM_AUTHOR or the user name")
    post.add_argument("--tag", action="append", default=[], dest="tags")
    post.add_argument("--channel", default="")
    post.add_argument("--reply-to", default="")
    for name, text in (("feed", "newest posts first"), ("watch", "print new posts as they come")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--author", default="")
        q.add_argument("--tag", default="")
        q.add_argument("--channel", default="")
    feed = sub.choices["feed"]
    feed.add_argument("--since", default="", help="unix seconds, ISO 8601, or an age: 15m, 2h")
    feed.add_argument("--limit", type=int, default=20)
    sub.choices["watch"].add_argument("--count", type=int, default=0,
                                      help="exit after this many posts (0: never)")
    search = sub.add_parser("search", help="posts best matching WORDS, by meaning and words")
    search.add_argument("words", nargs="+")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--mode", choices=[m.value for m in SearchMode], default="auto",
                        help="semantic, words or hybrid (auto: hybrid when the mesh "
                             "embeds, else words)")
    mcp = sub.add_parser("mcp", help="serve post/feed/search as MCP tools on stdio")
    mcp.add_argument("--author", default="", help="author of posts that name none "
                     "(default $MESHLLM_AUTHOR or the user name)")


def render(post: Post, hits: int | None = None) -> str:
    when = datetime.fromtimestamp(post.created_unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    tags = " ".join(f"#{t}" for t in post.tags)
    head = f"{when} {post.author}@{post.origin_node} {post.post_id}"
    extra = " ".join(x for x in (tags, f"[{post.channel}]" if post.channel else "",
                                 f"re {post.reply_to}" if post.reply_to else "",
                                 f"({hits} hits)" if hits is not None else "") if x)
    return f"{head} {extra}".rstrip() + "\n  " + post.text.replace("\n", "\n  ")


async def run_blackboard(args: argparse.Namespace, env: Mapping[str, str] | None = None
                         ) -> int:
    env = process_env() if env is None else env
    try:
        config = load_cli_config(env, _tls_argv(args))
        if args.blackboard_command == "mcp":
            from meshllm.blackboard.mcp_server import serve_stdio

            await serve_stdio(args.blackboard, args.author or config.default_author,
                              config.security)
            return 0
        async with BlackboardClient(args.blackboard, security=config.security) as client:
            return await _COMMANDS[args.blackboard_command](client, args, config)
    except PostRejected as exc:
        print(f"mesh-llm blackboard: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (ValueError, ConfigError) as exc:
        print(f"mesh-llm blackboard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BlackboardUnavailable as exc:
        print(f"mesh-llm blackboard: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BlackboardError as exc:
        print(f"mesh-llm blackboard: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


async def _post(client: BlackboardClient, args: argparse.Namespace,
                config: BoardCliConfig) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    draft = Draft(args.author or config.default_author, text, tuple(args.tags), args.channel,
                  PostId(args.reply_to) if args.reply_to else None)
    accepted = await client.post(draft)
    if args.json:
        print(json.dumps({**post_to_json(accepted.post),
                          "redactions": list(accepted.redactions)}))
    else:
        print(f"posted {accepted.post.post_id}")
        if accepted.redactions:
            print(f"redacted: {', '.join(accepted.redactions)}")
    return 0


async def _feed(client: BlackboardClient, args: argparse.Namespace, _: BoardCliConfig) -> int:
    since = parse_since(args.since, time.time_ns() // 1_000_000)
    posts = await client.feed(FeedQuery(since, args.author, args.tag, args.channel, args.limit))
    for post in posts:
        print(json.dumps(post_to_json(post)) if args.json else render(post))
    return 0


async def _search(client: BlackboardClient, args: argparse.Namespace,
                  _: BoardCliConfig) -> int:
    result = await client.search_result(" ".join(args.words), args.limit,
                                        SearchMode(args.mode))
    if result.note:  # on stderr, so that --json output stays one hit per line
        print(f"note: {result.note}", file=sys.stderr)
    for hit in result.hits:
        print(json.dumps(hit_to_json(hit)) if args.json else render(hit.post, hit.hits))
    return 0


async def _watch(client: BlackboardClient, args: argparse.Namespace,
                 _: BoardCliConfig) -> int:
    seen = 0
    async for post in client.subscribe(SubscribeFilter(args.author, args.tag, args.channel)):
        print(json.dumps(post_to_json(post)) if args.json else render(post), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


_COMMANDS = {"post": _post, "feed": _feed, "search": _search, "watch": _watch}

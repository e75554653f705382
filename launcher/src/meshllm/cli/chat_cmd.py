"""`mesh-llm chat [MODEL]`: a conversation in the terminal, each reply streamed through the
gateway's OpenAI API as it is generated (the way `ollama run` or `llama-cli` try a model).

The history is kept and sent with every turn; `/reset` forgets it, `/model NAME` switches
model, `/usage` shows the last reply's token counts, `/quit` or Ctrl-D leaves, Ctrl-C stops
a reply half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import httpx
from meshllm.cli.chat import (
    DEFAULT_URL,
    HELP,
    TIMEOUT,
    ChatFailed,
    Command,
    Conversation,
    Usage,
    default_url,
    first_model,
    parse_line,
    request_body,
    stream_reply,
    trusted,
)
from meshllm.cli.models_cmd import API_KEY_ENV, auth_headers
from meshllm.cli.up_config import DEFAULT_DATA_DIR

PROMPT = ">>> "


def add_chat_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (replies streamed)")
    p.add_argument("model", nargs="?", default="",
                   help="model to talk to (default: the first the gateway lists)")
    p.add_argument("--url", default="", help="the gateway's OpenAI API (default: where "
                   f"`mesh-llm up` serves, else {DEFAULT_URL})")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"where `mesh-llm up` keeps its state (default {DEFAULT_DATA_DIR})")
    p.add_argument("--system", default="", help="a system message that starts the chat")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per reply at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--api-key", default="",
                   help=f"the gateway's API key, when it needs one (or {API_KEY_ENV})")


class Repl:
    """Reads turns and commands, prints replies as they stream."""

    def __init__(self, client: httpx.Client, url: str, conversation: Conversation,
                 args: argparse.Namespace, out: TextIO) -> None:
        self.client, self.url, self.conversation = client, url, conversation
        self.max_tokens: int | None = args.max_tokens
        self.temperature: float | None = args.temperature
        self.out = out
        self.last_usage: Usage | None = None

    def say(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> int:
        self.say(f"mesh-llm chat: {self.conversation.model} at {self.url}\n{HELP}")
        while True:
            try:
                line = parse_line(input(PROMPT))
            except EOFError:  # Ctrl-D
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /quit leaves)")
                continue
            if isinstance(line, Command):
                if not self.command(line):
                    return 0
            elif line is not None:
                self.turn(line)

    def command(self, command: Command) -> bool:
        """Carry out `command`; False when the chat should end."""
        if command.name == "quit":
            return False
        if command.name == "reset":
            self.conversation.turns.clear()
            self.last_usage = None
            self.say("(conversation forgotten)")
        elif command.name == "model" and command.argument:
            self.conversation.model = command.argument
            self.say(f"(now talking to {command.argument}; the conversation is kept)")
        elif command.name == "model":
            self.say(f"(talking to {self.conversation.model}; /model NAME switches)")
        elif command.name == "usage":
            self.say(self.usage_text())
        else:
            unknown = f"unknown command {command.argument}; " if command.argument else ""
            self.say(f"({unknown}{HELP})")
        return True

    def usage_text(self) -> str:
        turns = len(self.conversation.turns) // 2
        kept = f"{turns} turn{'' if turns == 1 else 's'} kept"
        if self.last_usage is None:
            return f"(no reply yet; {kept})"
        u = self.last_usage
        return (f"(last reply: {u.prompt_tokens} prompt tokens, {u.completion_tokens} "
                f"completion tokens; {kept})")

    def turn(self, text: str) -> None:
        body = request_body(self.conversation, text, self.max_tokens, self.temperature)
        reply: list[str] = []
        try:
            for item in stream_reply(self.client, self.url, body):
                if isinstance(item, Usage):
                    self.last_usage = item
                else:
                    reply.append(item)
                    self.say(item, end="")
        except ChatFailed as exc:
            self.say(f"\nerror: {exc}")
            return  # the turn is not kept: the next one starts from the same history
        except KeyboardInterrupt:
            self.say("\n(stopped; this turn is not kept)")
            return
        answer = "".join(reply)
        if not answer.endswith("\n"):
            self.say("")
        self.conversation.record(text, answer)


def run_chat(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    url = (args.url or default_url(args.data_dir)).rstrip("/")
    try:
        with httpx.Client(timeout=TIMEOUT, verify=trusted(args.data_dir),
                          headers=auth_headers(args.api_key, env)) as client:
            model = args.model or first_model(client, url)
            return Repl(client, url, Conversation(model, args.system), args, sys.stdout).run()
    except KeyboardInterrupt:  # before the first prompt (listing the models)
        return 130

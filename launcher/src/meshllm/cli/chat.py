"""The conversation behind `mesh-llm chat` (chat_cmd.py): its commands, its history, the
request for each turn, and the reply streamed back as server-sent events.

httpx and a small event-stream reader: the launcher does not need the openai package.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from meshllm.cli.local_mesh import read_local_mesh
from meshllm.common.errors import MeshError

DEFAULT_URL = "http://localhost:9337/v1"
HELP = ("/reset forgets the conversation, /model NAME switches model, /usage shows the last "
        "reply's tokens, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply")
TIMEOUT = httpx.Timeout(10.0, read=600.0)  # a long reply on a slow machine is no failure


class ChatFailed(MeshError):
    """The gateway could not be reached or answered with an error."""

    reason = "chat_failed"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Command:
    name: str       # reset, model, usage, quit, help
    argument: str = ""


COMMANDS = {"/reset": "reset", "/clear": "reset", "/model": "model", "/usage": "usage",
            "/quit": "quit", "/exit": "quit", "/bye": "quit", "/help": "help", "/?": "help"}


def parse_line(line: str) -> Command | str | None:
    """A command, the text of a user turn, or None for an empty line."""
    text = line.strip()
    if not text:
        return None
    word, _, rest = text.partition(" ")
    if word.startswith("/"):
        name = COMMANDS.get(word.lower())
        return Command(name, rest.strip()) if name else Command("help", word)
    return text


@dataclass
class Conversation:
    model: str
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns, {"role": "user", "content": user_text}]

    def record(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text},
                       {"role": "assistant", "content": reply}]


def request_body(conversation: Conversation, user_text: str, max_tokens: int | None,
                 temperature: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": conversation.model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": conversation.messages(user_text)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def stream_items(lines: Iterable[str]) -> Iterator[str | Usage]:
    """The text deltas and the final usage in a chat completion's event stream."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # comments, blank separators
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            raise ChatFailed(str(chunk["error"].get("message", chunk["error"])))
        for choice in chunk.get("choices") or ():
            if text := (choice.get("delta") or {}).get("content"):
                yield text
        if usage := chunk.get("usage"):
            yield Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason_phrase


def stream_reply(client: httpx.Client, url: str, body: dict[str, Any]
                 ) -> Iterator[str | Usage]:
    try:
        with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ChatFailed(f"{response.status_code}: {_error_text(response)}")
            yield from stream_items(response.iter_lines())
    except httpx.HTTPError as exc:
        raise ChatFailed(f"cannot reach {url} ({exc}): is `mesh-llm up` running?") from exc


def first_model(client: httpx.Client, url: str) -> str:
    try:
        response = client.get(f"{url}/models")
        response.raise_for_status()
        models = [m["id"] for m in response.json()["data"]]
    except httpx.HTTPError as exc:
        raise ChatFailed(f"cannot list the models at {url} ({exc}): "
                         "is `mesh-llm up` running?") from exc
    if not models:
        raise ChatFailed(f"{url} serves no model yet (see `mesh-llm status`)")
    return str(models[0])


def default_url(data_dir: str) -> str:
    """Where the `mesh-llm up` of `data_dir` serves, else the usual port."""
    local = read_local_mesh(Path(data_dir).expanduser())
    return local.api_url if local else DEFAULT_URL


def trusted(data_dir: str) -> ssl.SSLContext | bool:
    """What to trust for HTTPS: the CA of the `mesh-llm up --tls` of `data_dir`, else the
    system's (True; httpx also honours SSL_CERT_FILE)."""
    local = read_local_mesh(Path(data_dir).expanduser())
    context = local.ssl_context() if local else None
    return context if context is not None else True

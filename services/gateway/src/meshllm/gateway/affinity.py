"""Prefix affinity, as llm-d's prefix-aware scorer: which replica last served a prompt's
leading blocks, so that a conversation goes back to the replica whose KV cache holds them.

The gateway does not render chat templates (workers do), so a chat's blocks are its
messages: key i is a hash of messages 0..i (and the tools, rendered before them). A
completion's blocks are fixed-size runs of its text. Keys are chained hashes, so equal
keys mean equal prefixes, and a request's keys run from its shortest prefix to its
longest."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

from meshllm.common.types import ChatMessage, ModelId, WorkerId

TEXT_BLOCK_CHARS = 128     # a completion prompt's block (about 30 tokens of English)
PREFIX_TABLE_SIZE = 10_000  # prefix keys remembered, least recently used dropped first


def _chained(seed: str, blocks: Sequence[str]) -> tuple[int, ...]:
    keys, digest = [], hashlib.blake2b(seed.encode(), digest_size=8).digest()
    for block in blocks:
        digest = hashlib.blake2b(digest + block.encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "big"))
    return tuple(keys)


def _message_block(message: ChatMessage) -> str:
    calls = [[c.call_id, c.name, c.arguments] for c in message.tool_calls]
    return json.dumps([message.role, message.content, calls, message.tool_call_id,
                       message.name], ensure_ascii=False)


def chat_keys(model_id: ModelId, messages: Sequence[ChatMessage],
              tools_json: str = "") -> tuple[int, ...]:
    """One key per message: the hash of the conversation up to and including it."""
    return _chained(f"chat\0{model_id}\0{tools_json}",
                    [_message_block(m) for m in messages])


def text_keys(model_id: ModelId, text: str,
              block_chars: int = TEXT_BLOCK_CHARS) -> tuple[int, ...]:
    """One key per whole block of the prompt (a shorter tail has none)."""
    blocks = [text[i:i + block_chars]
              for i in range(0, len(text) - block_chars + 1, block_chars)]
    return _chained(f"text\0{model_id}", blocks)


def prefix_keys(model_id: ModelId, text: str | None, chat: Sequence[ChatMessage] | None,
                tools_json: str = "") -> tuple[int, ...]:
    """The keys of a generation request's prompt, whichever kind it is."""
    if chat is not None:
        return chat_keys(model_id, chat, tools_json)
    return text_keys(model_id, text or "")


def longest_match(keys: Sequence[int], table: Mapping[int, WorkerId]
                  ) -> tuple[WorkerId | None, int]:
    """The replica that served the longest known prefix among `keys`, and how many of
    the keys that prefix covers (0: none known)."""
    for depth in range(len(keys), 0, -1):
        worker = table.get(keys[depth - 1])
        if worker is not None:
            return worker, depth
    return None, 0


class PrefixTable(Mapping[int, WorkerId]):
    """A bounded LRU from prefix key to the replica that last served that prefix. Reading
    it (as routing does) changes nothing; `remember` refreshes and evicts."""

    def __init__(self, capacity: int = PREFIX_TABLE_SIZE) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[int, WorkerId] = OrderedDict()

    def remember(self, keys: Sequence[int], worker_id: WorkerId) -> None:
        for key in keys:
            self._entries[key] = worker_id
            self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def __getitem__(self, key: int) -> WorkerId:
        return self._entries[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

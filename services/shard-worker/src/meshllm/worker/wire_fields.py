"""A typed reader of JSON objects from the engine pipe (`engine_wire` decodes with it):
each field read with its type checked, none left unread, anything else refused with
`MalformedEngineMessage`."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar, cast

from meshllm.common.errors import EngineUnavailable

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


class MalformedEngineMessage(EngineUnavailable):
    """A line on the engine pipe that is no valid message: the two sides disagree, or
    something other than the protocol wrote to the pipe."""

    reason = "malformed_engine_message"


class Fields:
    """The fields of one JSON object, each read with its type checked, none left unread."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise MalformedEngineMessage(f"{where}: expected an object, got {obj!r:.80}")
        self._obj: dict[str, object] = obj
        self._where = where
        self._read: set[str] = set()

    def _get(self, key: str, kinds: tuple[type, ...], what: str) -> object:
        if key not in self._obj:
            raise MalformedEngineMessage(f"{self._where}: {key} is missing")
        self._read.add(key)
        value = self._obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise MalformedEngineMessage(
                f"{self._where}: {key} must be {what}, got {value!r:.80}")
        return value

    # _get has checked each value's type: the casts below only tell mypy so.

    def text(self, key: str) -> str:
        return cast(str, self._get(key, (str,), "a string"))

    def optional_text(self, key: str) -> str | None:
        return cast("str | None", self._get(key, (str, type(None)), "a string or null"))

    def integer(self, key: str) -> int:
        return cast(int, self._get(key, (int,), "an integer"))

    def optional_integer(self, key: str) -> int | None:
        return cast("int | None", self._get(key, (int, type(None)), "an integer or null"))

    def number(self, key: str) -> float:
        return float(cast(float, self._get(key, (int, float), "a number")))

    def flag(self, key: str) -> bool:
        return cast(bool, self._get(key, (bool,), "true or false"))

    def _list(self, key: str, item: type, what: str) -> list[object]:
        values = cast(list[object], self._get(key, (list,), f"a list of {what}"))
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in values):
            raise MalformedEngineMessage(f"{self._where}: {key} must hold only {what}")
        return values

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(cast(list[str], self._list(key, str, "strings")))

    def integers(self, key: str) -> tuple[int, ...]:
        return tuple(cast(list[int], self._list(key, int, "integers")))

    def text_map(self, key: str) -> dict[str, str]:
        inner = Fields(self._get(key, (dict,), "an object"), f"{self._where}.{key}")
        return {k: inner.text(k) for k in list(inner._obj)}

    def nested(self, key: str, decode: Callable[[Fields], T]) -> T:
        return decoded(self._get(key, (dict,), "an object"), f"{self._where}.{key}", decode)

    def optional_nested(self, key: str, decode: Callable[[Fields], T]) -> T | None:
        value = self._get(key, (dict, type(None)), "an object or null")
        return None if value is None else decoded(value, f"{self._where}.{key}", decode)

    def objects(self, key: str, decode: Callable[[Fields], T]) -> tuple[T, ...]:
        values = self._list(key, dict, "objects")
        return tuple(decoded(v, f"{self._where}.{key}[{i}]", decode)
                     for i, v in enumerate(values))

    def hex_bytes(self, key: str) -> bytes:
        try:
            return bytes.fromhex(self.text(key))
        except ValueError as exc:
            raise MalformedEngineMessage(f"{self._where}: {key} must be hex bytes") from exc

    def hex_list(self, key: str) -> tuple[bytes, ...]:
        try:
            return tuple(bytes.fromhex(v) for v in self.texts(key))
        except ValueError as exc:
            raise MalformedEngineMessage(f"{self._where}: {key} must hold hex bytes") from exc

    def texts_or_token_lists(self, key: str) -> tuple[str | tuple[int, ...], ...]:
        """A list whose items are each a string or a list of token ids."""
        values = cast(list[object], self._get(key, (list,), "a list"))
        items: list[str | tuple[int, ...]] = []
        for v in values:
            if isinstance(v, str):
                items.append(v)
            elif isinstance(v, list) and all(type(t) is int for t in v):
                items.append(tuple(cast(list[int], v)))
            else:
                raise MalformedEngineMessage(
                    f"{self._where}: {key} must hold strings or lists of token ids")
        return tuple(items)

    def choice(self, key: str, kind: type[E]) -> E:
        try:
            return kind(self.text(key))
        except ValueError as exc:
            raise MalformedEngineMessage(
                f"{self._where}: {key} must be one of {[k.value for k in kind]}") from exc

    def token_biases(self, key: str) -> tuple[tuple[int, float], ...]:
        pairs = self._list(key, list, "[token id, bias] pairs")
        if not all(len(p) == 2 and type(p[0]) is int and type(p[1]) in (int, float)
                   for p in cast(list[list[object]], pairs)):
            raise MalformedEngineMessage(f"{self._where}: {key} must hold [token id, bias]")
        return tuple((int(cast(int, p[0])), float(cast(float, p[1])))
                     for p in cast(list[list[object]], pairs))

    def optional_list(self, key: str, decode: Callable[[Fields], T]) -> tuple[T, ...] | None:
        values = cast("list[object] | None", self._get(key, (list, type(None)), "a list or null"))
        if values is None:
            return None
        return tuple(decoded(v, f"{self._where}.{key}[{i}]", decode)
                     for i, v in enumerate(values))

    def done(self) -> None:
        unknown = sorted(set(self._obj) - self._read)
        if unknown:
            raise MalformedEngineMessage(f"{self._where}: unknown fields {', '.join(unknown)}")


def decoded(obj: object, where: str, decode: Callable[[Fields], T]) -> T:
    fields = Fields(obj, where)
    value = decode(fields)
    fields.done()
    return value


"""One JSON object of a status document, read field by field: every error names the
field's path (`models[2].replicas[0].stages`), so a gateway and a CLI of different
versions say plainly what they disagree on. Part of the mesh status (status.py), kept
apart for size."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import NoReturn, TypeVar

from meshllm.common.errors import InvalidRecord

E = TypeVar("E", bound=enum.Enum)


class Fields:
    """One JSON object of a status document; every error names the field's path."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise InvalidRecord(f"status {f'field {path}' if path else 'document'}: "
                                "expected an object")
        self._data: dict[str, object] = data
        self._path = path

    def path(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise InvalidRecord(f"status field {self.path(key)}: {problem}")

    def get(self, key: str) -> object:
        if key not in self._data:
            self.fail(key, "missing")
        return self._data[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {value!r:.40}")
        return value

    def integer(self, key: str) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"expected an integer, got {value!r:.40}")
        return value

    def flag(self, key: str) -> bool:
        """A true/false field; absent (a gateway from before it) is false."""
        value = self._data.get(key, False)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r:.40}")
        return value

    def count(self, key: str) -> int:
        """A whole number >= 0; absent (a gateway from before it) is 0."""
        return self.integer(key) if key in self._data else 0

    def optional_integer(self, key: str) -> int | None:
        return None if self.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.fail(key, f"expected a number, got {value!r:.40}")
        return float(value)

    def choice(self, key: str, kind: type[E]) -> E:
        value = self.text(key)
        try:
            return kind(value)
        except ValueError:
            self.fail(key, f"unknown value {value!r:.40}")

    def mapping(self, key: str) -> Fields:
        return Fields(self.get(key), self.path(key))

    def objects(self, key: str) -> Iterator[Fields]:
        value = self.get(key)
        if not isinstance(value, list):
            self.fail(key, "expected a list")
        for i, item in enumerate(value):
            yield Fields(item, f"{self.path(key)}[{i}]")

    def names(self) -> list[str]:
        return list(self._data)

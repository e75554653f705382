"""Checking objects against OpenAI's published OpenAPI document, where a checkout has it
(shared/openai-openapi.yaml in or beside the repository; tests that need it skip without)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PLACES = (REPO / "shared", REPO.parent / "shared")
SPEC = next((place / "openai-openapi.yaml" for place in PLACES
             if (place / "openai-openapi.yaml").is_file()), PLACES[-1] / "openai-openapi.yaml")


@functools.cache
def _components() -> dict[str, Any]:
    with SPEC.open() as f:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # C: seconds faster
        return {"components": yaml.load(f, Loader=loader)["components"]}


def _validator(name: str) -> jsonschema.protocols.Validator:
    if not SPEC.is_file():
        pytest.skip(f"OpenAI's OpenAPI document is not at {SPEC}")
    schema = {**_components(), "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def check(name: str, value: Any) -> None:
    """Fails the test unless `value` is valid as the schema `name` (e.g. "Response")."""
    errors = sorted(_validator(name).iter_errors(value), key=lambda e: e.path)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}"
                                 for e in errors[:5])


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Stream event type -> the name of its schema (each pins `type` to one value)."""
    if not SPEC.is_file():
        return {}
    found = {}
    for name, schema in _components()["components"]["schemas"].items():
        kinds = schema.get("properties", {}).get("type", {}).get("enum", [])
        if name.endswith("Event") and len(kinds) == 1:
            found[kinds[0]] = name
    return found


def check_event(event: dict[str, Any]) -> None:
    """Fails the test unless `event` is valid as the schema of its own type."""
    if not SPEC.is_file():
        pytest.skip(f"OpenAI's OpenAPI document is not at {SPEC}")
    name = _event_schemas().get(event["type"])
    assert name is not None, f"no event type {event['type']} in the API"
    check(name, event)

"""`mesh-llm models add|rm|ls`: declare models at run time, remove them, list them with
their state, through the gateway's /api/models (found as `mesh-llm chat` finds it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import httpx
from meshllm.cli.chat import DEFAULT_URL, default_url, trusted
from meshllm.cli.up_config import DEFAULT_DATA_DIR
from meshllm.common.errors import MeshError

API_KEY_ENV = "MESHLLM_API_KEY"
TIMEOUT = httpx.Timeout(30.0)


class ModelsCommandFailed(MeshError):
    """The gateway could not be reached or refused the request."""

    reason = "models_command_failed"


def add_models_parser(sub: Any) -> None:
    gateway = argparse.ArgumentParser(add_help=False)  # every subcommand's options
    gateway.add_argument("--url", default="", help="the gateway (default: where `mesh-llm "
                         f"up` serves, else {DEFAULT_URL.removesuffix('/v1')})")
    gateway.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where `mesh-llm up` "
                         f"keeps its state (default {DEFAULT_DATA_DIR})")
    gateway.add_argument("--api-key", default="",
                         help=f"the gateway's API key (or {API_KEY_ENV})")
    p = sub.add_parser("models", help="declare, remove and list the mesh's models")
    cmd = p.add_subparsers(dest="models_command", required=True)
    add = cmd.add_parser("add", parents=[gateway],
                         help="declare a model: the planner loads it where it fits")
    add.add_argument("model", help="a model name (gemma3-270m) or the path of a .gguf file")
    add.add_argument("--min-replicas", type=int, default=0, help="kept whatever the demand")
    add.add_argument("--max-replicas", type=int, default=0, help="0: as many as fit")
    add.add_argument("--priority", type=int, default=0, help="higher is served first")
    rm = cmd.add_parser("rm", parents=[gateway],
                        help="remove a declared model: its workers unload it")
    rm.add_argument("model_id", help="the model's id, as `mesh-llm models ls` shows it")
    ls = cmd.add_parser("ls", parents=[gateway],
                        help="the declared models and whether they serve")
    ls.add_argument("--json", action="store_true", help="print the gateway's JSON")


def auth_headers(flag_key: str, env: Mapping[str, str]) -> dict[str, str]:
    """The Authorization header for the gateway: --api-key, else MESHLLM_API_KEY."""
    key = flag_key or env.get(API_KEY_ENV, "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def gateway_url(args: argparse.Namespace) -> str:
    """The gateway's root: --url (with or without /v1), else the local mesh's."""
    url = (args.url or default_url(args.data_dir)).rstrip("/")
    return url.removesuffix("/v1")


def table(declarations: Sequence[Mapping[str, Any]]) -> str:
    """`ls` output: one line per model, the reason under a model that does not serve."""
    header = ("ID", "STATE", "READY", "MIN", "MAX", "PRIORITY", "MODEL")
    rows = [(d["id"], d["state"], f"{d['ready_replicas']}/{d['replicas']}",
             str(d["min_replicas"]), str(d["max_replicas"] or "-"), str(d["priority"]),
             d["model"]) for d in declarations]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + (
            "  " + row[-1])

    lines = [line(header)]
    for row, declaration in zip(rows, declarations, strict=True):
        lines.append(line(row))
        if declaration["state"] != "serving" and declaration["reason"]:
            lines.append(f"    {declaration['reason']}")
    return "\n".join(lines)


def _call(client: httpx.Client, method: str, url: str, body: Any = None) -> Any:
    try:
        response = client.request(method, url, json=body)
    except httpx.HTTPError as exc:
        raise ModelsCommandFailed(f"cannot reach the gateway at {url} ({exc}): is "
                                  "`mesh-llm up` running?") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.is_error:
        message = (data.get("error", {}).get("message") if isinstance(data, dict) else None)
        raise ModelsCommandFailed(f"{response.status_code}: {message or response.text}")
    return data


def run_models(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    root = gateway_url(args)
    headers = auth_headers(args.api_key, env)
    with httpx.Client(timeout=TIMEOUT, verify=trusted(args.data_dir), headers=headers) as client:
        if args.models_command == "add":
            body = {"model": args.model, "min_replicas": args.min_replicas,
                    "max_replicas": args.max_replicas, "priority": args.priority}
            made = _call(client, "POST", f"{root}/api/models", body)
            out.write(f"declared {made['id']} ({made['model']}): `mesh-llm models ls` "
                      "shows when it serves\n")
        elif args.models_command == "rm":
            _call(client, "DELETE", f"{root}/api/models/{quote(args.model_id, safe='')}")
            out.write(f"removed {args.model_id}: its workers unload it\n")
        else:
            listed = _call(client, "GET", f"{root}/api/models")
            out.write((json.dumps(listed, indent=2) if args.json else table(listed["data"]))
                      + "\n")
    return 0

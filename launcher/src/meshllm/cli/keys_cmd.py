"""`mesh-llm keys`: make API keys for the gateway, and their lines for its keys file."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from meshllm.common.errors import MeshError
from meshllm.gateway.auth import file_line, key_name, new_key, parse_entry, plain_key


def add_keys_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="make API keys for the gateway (mesh-llm keys new NAME)")
    actions = p.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser("new", help="print a fresh key (once) and its keys-file line")
    new.add_argument("name", help="who or what the key is for (letters, digits, . _ - @)")
    new.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    new.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    new.add_argument("--concurrent", type=int, default=0,
                     help="requests in flight at once (0: no limit)")
    new.add_argument("--models", default="", help="comma-separated models it may use "
                     "(default: all)")
    actions.add_parser("hash", help="read a key on stdin, print its keys-file line")


def entry_line(name: str, key: str, rpm: int = 0, tpm: int = 0, concurrent: int = 0,
               models: str = "") -> str:
    """The keys-file line, checked by the parser the gateway itself uses."""
    fields = [f"rpm={rpm}"] if rpm else []
    fields += [f"tpm={tpm}"] if tpm else []
    fields += [f"concurrent={concurrent}"] if concurrent else []
    fields += [f"models={models}"] if models else []
    try:
        line = " ".join([file_line(key_name(name), key), *fields])
        parse_entry(line)
    except ValueError as exc:
        raise MeshError(f"bad key entry: {exc}") from exc
    return line


def run_keys(args: argparse.Namespace, stdin: TextIO = sys.stdin,
             stdout: TextIO = sys.stdout) -> int:
    if args.keys_command == "hash":
        try:
            key = plain_key(stdin.readline().strip())
        except ValueError as exc:
            raise MeshError(str(exc)) from exc
        print(file_line("NAME", key), file=stdout)
        return 0
    key = new_key()
    line = entry_line(args.name, key, args.rpm, args.tpm, args.concurrent, args.models)
    print(f"API key for {args.name} (shown only now; the gateway keeps its hash):\n"
          f"  {key}\n"
          f"Line for the keys file (--api-keys-file / MESHLLM_API_KEYS_FILE):\n"
          f"  {line}", file=stdout)
    return 0

"""`mesh-llm`: start a local mesh, inspect it, or run one service as a container would."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from meshllm.cli.blackboard_cmd import add_blackboard_parser, run_blackboard
from meshllm.cli.calibrate_cmd import add_calibrate_parser, run_calibrate
from meshllm.cli.chat_cmd import add_chat_parser, run_chat
from meshllm.cli.keys_cmd import add_keys_parser, run_keys
from meshllm.cli.models_cmd import add_models_parser, run_models
from meshllm.cli.status_cmd import add_status_parser, run_status
from meshllm.common.config import process_env
from meshllm.common.errors import MeshError


def _service_mains() -> dict[str, Callable[[Sequence[str]], int]]:
    # Imported on use: `mesh-llm status` should not pay for loading every service.
    from meshllm.blackboard.__main__ import main as blackboard
    from meshllm.gateway.__main__ import main as gateway
    from meshllm.planner.__main__ import main as planner
    from meshllm.worker.__main__ import main as worker

    return {"gateway": gateway, "planner": planner, "worker": worker, "blackboard": blackboard}


SERVICES = ("gateway", "planner", "worker", "blackboard")


def _run_up(argv: Sequence[str]) -> int:
    # Imported on use: loading `up` loads every service's options.
    from meshllm.cli.up import run_up
    from meshllm.cli.up_config import load_up_config

    return run_up(load_up_config(argv, process_env()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesh-llm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start a local mesh and serve the OpenAI API "
                   "(flags: mesh-llm up --help)", add_help=False)
    add_status_parser(sub)
    add_chat_parser(sub)
    add_blackboard_parser(sub)
    add_keys_parser(sub)
    add_models_parser(sub)
    add_calibrate_parser(sub)
    for name in ("gateway", "planner", "worker"):
        sub.add_parser(name, help=f"run the {name} service (flags: mesh-llm {name} --help)",
                       add_help=False)
    return p


def service_argv(args: list[str]) -> list[str] | None:
    """The service's own flags when `args` asks to run a service, else None.

    `mesh-llm blackboard` doubles as the board's client (post, feed, search, watch, mcp);
    `blackboard_cmd.node_argv` says which of the two the rest of `args` asks for.
    """
    from meshllm.cli.blackboard_cmd import node_argv

    if not args or args[0] not in SERVICES:
        return None
    return node_argv(args[1:]) if args[0] == "blackboard" else args[1:]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    own_flags = service_argv(args_list)
    if own_flags is not None:
        return _service_mains()[args_list[0]](own_flags)
    if args_list[:1] == ["up"]:
        # up reads its own flags and variables, like a service (read_options)
        return _report_errors("up", lambda: _run_up(args_list[1:]))
    args = parser().parse_args(args_list)
    if args.command == "blackboard":
        return _report_errors("blackboard",
                              lambda: asyncio.run(run_blackboard(args, process_env())))
    if args.command == "chat":
        return _report_errors("chat", lambda: run_chat(args, process_env()))
    if args.command == "keys":
        return _report_errors("keys", lambda: run_keys(args))
    if args.command == "calibrate":
        return _report_errors("calibrate", lambda: run_calibrate(args))
    if args.command == "models":
        return _report_errors("models", lambda: run_models(args, process_env(), sys.stdout))
    return _report_errors(args.command, lambda: run_status(args))


def _report_errors(command: str, run: Callable[[], int]) -> int:
    try:
        return run()
    except MeshError as exc:
        print(f"mesh-llm {command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m meshllm.worker.engine`: the engine process, one llama.cpp model serving many
requests at once (continuous batching), driven over stdin/stdout with the messages of
`meshllm.worker.engine_wire`.

It runs apart from the service so that a native crash or abort (llama.cpp aborts on a
lost RPC peer, for one) kills only this process; the service reports it and restarts it.
The first command is Load; the answer is Progress events, then Loaded or LoadFailed.
Generate and Cancel follow until stdin closes; Stats come when the counters change.
Logs go to stderr in the services' format.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

import meshllm.worker.engine_wire as wire
from meshllm.common.logs import setup_logging
from meshllm.worker.engine.batch import BatchEngine
from meshllm.worker.engine.channel import Channel
from meshllm.worker.engine.loading import load_engine
from meshllm.worker.engine.session import Session

log = logging.getLogger("meshllm.worker.engine")


def _load(first_line: bytes, out: Channel) -> BatchEngine | None:
    """The engine the first command asks for; None once the failure has been reported."""
    try:
        command = wire.decode_command(first_line)
        if not isinstance(command, wire.Load):
            raise wire.MalformedEngineMessage(f"the first command must be load, got {command}")
        engine = load_engine(command, lambda fraction: out.send(wire.Progress(fraction)))
    except Exception as exc:  # any load failure is reported to the service, which decides
        log.exception("loading the model failed")
        out.send(wire.LoadFailed(wire.WireError.of(exc)))
        return None
    log.info("loaded %s: %d slots of %d tokens in %d group(s), speculative decoding %s",
             command.model_path.name, engine.config.n_slots, engine.config.n_ctx_slot,
             engine.config.groups, engine.config.spec_mode.value)
    return engine


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshllm.worker.engine")
    parser.add_argument("--log-level", default=wire.DEFAULT_LOG_LEVEL)
    args = parser.parse_args(argv)
    out = Channel()  # first: from here on nothing else reaches the event stream
    setup_logging("engine", args.log_level)
    # Loaded before the Load command: a process the worker started ahead of need
    # (warm_engines) has paid for llama.cpp's libraries when the command comes.
    import llama_cpp  # noqa: F401
    first = sys.stdin.buffer.readline()
    if not first:
        return 0  # closed before any command: started ahead of a load that never came
    engine = _load(first, out)
    if engine is None:
        return 1
    engine.start()
    out.send(wire.Loaded(engine.config.n_ctx_slot))
    session = Session(engine, out)
    threading.Thread(target=session.report_stats, daemon=True).start()
    try:
        for line in sys.stdin.buffer:
            session.handle(wire.decode_command(line))
    except wire.MalformedEngineMessage:
        log.exception("the worker sent what this engine cannot read; exiting")
        return 2
    engine.stop()  # the service closed our stdin: finish and exit
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One log format for every service, so that interleaved output from a local mesh reads well."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-5s %(service)s %(name)s: %(message)s"


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_ServiceFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aetcd", "grpc", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

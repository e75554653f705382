"""Where a running `mesh-llm up` can be reached: written by `up` into its data directory,
read by `mesh-llm status` (a record between two processes, so typed and validated)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.errors import InvalidRecord

FILE_NAME = "mesh.json"


@dataclass(frozen=True)
class LocalMesh:
    etcd_url: str
    gateway_port: int

    def write(self, data_dir: Path) -> None:
        record = {"etcd": self.etcd_url, "port": self.gateway_port}
        (data_dir / FILE_NAME).write_text(json.dumps(record))


def read_local_mesh(data_dir: Path) -> LocalMesh | None:
    """The record `up` left in `data_dir`; None when there is none."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        etcd, port = record["etcd"], record["port"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRecord(f"{path} is not a mesh-llm up record ({exc}); delete it") from exc
    if not isinstance(etcd, str) or not isinstance(port, int) or isinstance(port, bool):
        raise InvalidRecord(f"{path}: etcd must be a URL and port a number; delete it")
    return LocalMesh(etcd, port)

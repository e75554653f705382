"""Where a running `mesh-llm up` can be reached: written by `up` into its data directory,
read by `mesh-llm status` and `mesh-llm chat` (a record between two processes, so typed
and validated)."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.common.errors import InvalidRecord
from meshllm.common.tls import GrpcSecurity, security_from

FILE_NAME = "mesh.json"


@dataclass(frozen=True)
class MeshCerts:
    ca: Path         # the CA certificate: what clients and services trust
    cert: Path       # the node certificate, for every service, etcd and the HTTPS port
    key: Path        # its private key

    def service_env(self) -> dict[str, str]:
        """The variables that turn on mutual TLS in every service and HTTPS at the gateway."""
        return {"MESHLLM_TLS_CERT": str(self.cert), "MESHLLM_TLS_KEY": str(self.key),
                "MESHLLM_TLS_CA": str(self.ca), "MESHLLM_HTTPS_CERT": str(self.cert),
                "MESHLLM_HTTPS_KEY": str(self.key)}

    def security(self) -> GrpcSecurity:
        return security_from({"tls_cert": self.cert, "tls_key": self.key, "tls_ca": self.ca})


@dataclass(frozen=True)
class LocalMesh:
    etcd_url: str
    gateway_port: int
    certs: MeshCerts | None = None  # `up --tls`: what its services present and trust

    @property
    def base_url(self) -> str:
        """The gateway's root: /v1 (the OpenAI API), /api, /console below it."""
        return f"{'https' if self.certs else 'http'}://localhost:{self.gateway_port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def ssl_context(self) -> ssl.SSLContext | None:
        """What a client of this mesh's gateway trusts: its CA (None: plain HTTP)."""
        return ssl.create_default_context(cafile=str(self.certs.ca)) if self.certs else None

    def write(self, data_dir: Path) -> None:
        tls = ({"ca": str(self.certs.ca), "cert": str(self.certs.cert),
                "key": str(self.certs.key)} if self.certs else None)
        record = {"etcd": self.etcd_url, "port": self.gateway_port, "tls": tls}
        (data_dir / FILE_NAME).write_text(json.dumps(record))


def _certs(tls: Any, path: Path) -> MeshCerts | None:
    if tls is None:
        return None
    if not isinstance(tls, dict) or not all(isinstance(tls.get(k), str)
                                            for k in ("ca", "cert", "key")):
        raise InvalidRecord(f"{path}: tls must name the ca, cert and key files; delete it")
    return MeshCerts(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]))


def read_local_mesh(data_dir: Path) -> LocalMesh | None:
    """The record `up` left in `data_dir`; None when there is none."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        etcd, port, tls = record["etcd"], record["port"], record.get("tls")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRecord(f"{path} is not a mesh-llm up record ({exc}); delete it") from exc
    if not isinstance(etcd, str) or not isinstance(port, int) or isinstance(port, bool):
        raise InvalidRecord(f"{path}: etcd must be a URL and port a number; delete it")
    return LocalMesh(etcd, port, _certs(tls, path))

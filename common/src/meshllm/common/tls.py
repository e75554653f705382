"""How the services' gRPC authenticates: plaintext by default, mutual TLS when configured.

With TLS every node holds a certificate signed by the mesh's CA and its private key; a
server accepts only clients presenting such a certificate, and a client accepts only
servers presenting one. Every gRPC server and channel of the mesh (workers, planner,
blackboard, the gateway's calls, the tunnel that carries split models' ggml RPC bytes,
the pings) is built here, so one setting covers them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from meshllm.common.config import Option, read_options
from meshllm.common.errors import ConfigError

TLS_OPTIONS = (
    Option("--tls-cert", "MESHLLM_TLS_CERT", str, "",
           "PEM certificate of this node: mutual TLS on all mesh gRPC (with key and CA)"),
    Option("--tls-key", "MESHLLM_TLS_KEY", str, "", "PEM private key of --tls-cert"),
    Option("--tls-ca", "MESHLLM_TLS_CA", str, "", "PEM CA certificate every node's is signed by"),
    Option("--tls-server-name", "MESHLLM_TLS_SERVER_NAME", str, "",
           "name all nodes' certificates carry (default: the host each address dials)"),
)
_KEYS = {"tls_cert": "--tls-cert / MESHLLM_TLS_CERT", "tls_key": "--tls-key / MESHLLM_TLS_KEY",
         "tls_ca": "--tls-ca / MESHLLM_TLS_CA"}


@dataclass(frozen=True)
class GrpcSecurity:
    cert_chain: bytes = b""   # PEM; all three empty: plaintext
    private_key: bytes = b""
    root_certs: bytes = b""
    server_name: str = ""     # checked against peers' certificates instead of the dialled host

    @property
    def tls(self) -> bool:
        return bool(self.cert_chain)

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        """Bind `listen`; returns the port (0 when it could not be bound)."""
        if not self.tls:
            return int(server.add_insecure_port(listen))
        credentials = grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.root_certs,
            require_client_auth=True)
        return int(server.add_secure_port(listen, credentials))

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = (),
                interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options),
                                             interceptors=list(interceptors))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certs, private_key=self.private_key,
            certificate_chain=self.cert_chain)
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=list(options),
                                       interceptors=list(interceptors))


PLAINTEXT = GrpcSecurity()


def _read_pem(key: str, path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(_KEYS[key], f"cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(_KEYS[key], f"{path} is not a PEM file")
    return data


def security_from(values: Mapping[str, Any]) -> GrpcSecurity:
    """The security the TLS_OPTIONS values ask for; all three files or none."""
    given = {k: str(values.get(k) or "") for k in _KEYS}
    if not any(given.values()):
        return PLAINTEXT
    missing = [_KEYS[k] for k, v in given.items() if not v]
    if missing:
        raise ConfigError(", ".join(missing), "TLS needs a certificate, its key and the CA: "
                          "set all three, or none for plaintext")
    return GrpcSecurity(_read_pem("tls_cert", given["tls_cert"]),
                        _read_pem("tls_key", given["tls_key"]),
                        _read_pem("tls_ca", given["tls_ca"]),
                        str(values.get("tls_server_name") or ""))


def security_from_env(prog: str, env: Mapping[str, str], argv: Sequence[str] = ()
                      ) -> GrpcSecurity:
    """For programs that are not services (CLI, MCP server, health probe): the --tls-*
    flags in `argv`, else the MESHLLM_TLS_* variables."""
    return security_from(read_options(prog, TLS_OPTIONS, argv, env))

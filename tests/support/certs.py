"""Certificates for mutual-TLS tests: a mesh CA with one node certificate valid for
127.0.0.1 and localhost, and an unrelated CA with its own, which the mesh must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from meshllm.common.tls import GrpcSecurity, security_from_env


@dataclass(frozen=True)
class NodeFiles:
    cert: Path
    key: Path
    ca: Path

    def env(self) -> dict[str, str]:
        return {"MESHLLM_TLS_CERT": str(self.cert), "MESHLLM_TLS_KEY": str(self.key),
                "MESHLLM_TLS_CA": str(self.ca)}

    def security(self) -> GrpcSecurity:
        return security_from_env("test client", self.env())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def make_node(directory: Path, ca_name: str = "mesh-llm test CA") -> NodeFiles:
    """A CA and one node certificate signed by it, written as PEM files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    node_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    node_cert = (_builder("mesh-llm node", ca_name, node_key.public_key())
                 .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    files = NodeFiles(directory / "node.pem", directory / "node.key", directory / "ca.pem")
    files.cert.write_bytes(node_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(_pem_key(node_key))
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files

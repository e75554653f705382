"""`mesh-llm up --tls`: a small certificate authority for the local mesh and one node
certificate signed by it, kept under the data directory and reused while they are good.

Every service presents the node certificate and trusts only the CA, so every gRPC link is
mutually authenticated, and the gateway serves HTTPS with the same certificate; a client
trusts `ca.pem` to reach it. Keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from meshllm.cli.local_mesh import MeshCerts

CA_DAYS = 3650
NODE_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)  # a node certificate closer to its end is remade
CA_NAME = "mesh-llm local CA"


def ensure_mesh_certs(directory: Path, now: datetime.datetime | None = None) -> MeshCerts:
    """The CA and node certificate in `directory`, made when absent, the node one remade
    when it is near its end or was not signed by this CA."""
    now = now or datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    files = MeshCerts(directory / "ca.pem", directory / "node.pem", directory / "node-key.pem")
    ca_key_path = directory / "ca-key.pem"
    if not (files.ca.exists() and ca_key_path.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(ca_key_path, ca_key)
        _write_cert(files.ca, _ca_cert(ca_key, now))
        _make_node(files, ca_key, now)
        return files
    if not _node_is_good(files, now):
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path} is not an EC key: delete {directory} to start over")
        _make_node(files, loaded, now)
    return files


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, public_key: ec.EllipticCurvePublicKey, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(CA_NAME))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _ca_cert(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    return (_builder(CA_NAME, key.public_key(), now, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))


def node_names() -> x509.SubjectAlternativeName:
    """Every name a local client may dial: localhost, the loopback addresses, the host."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    host = socket.gethostname()
    if host and host != "localhost":
        names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _make_node(files: MeshCerts, ca_key: ec.EllipticCurvePrivateKey,
               now: datetime.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (_builder("mesh-llm node", key.public_key(), now, NODE_DAYS)
            .add_extension(node_names(), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(files.key, key)
    _write_cert(files.cert, cert)


def _node_is_good(files: MeshCerts, now: datetime.datetime) -> bool:
    if not (files.cert.exists() and files.key.exists()):
        return False
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE > now


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

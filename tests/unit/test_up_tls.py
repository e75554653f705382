"""`mesh-llm up --tls`: the local CA and node certificate (made once, reused, renewed near
their end), the record that tells clients to trust it, and the gateway's HTTPS options."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from meshllm.cli.certs import RENEW_BEFORE, ensure_mesh_certs
from meshllm.cli.local_mesh import LocalMesh, MeshCerts, read_local_mesh
from meshllm.cli.up import etcd_tls_flags
from meshllm.common.errors import ConfigError, InvalidRecord
from meshllm.common.store import EtcdStore
from meshllm.gateway.config import load_config

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def test_the_node_certificate_is_signed_by_the_ca_for_local_names(tmp_path: Path) -> None:
    certs = ensure_mesh_certs(tmp_path, NOW)
    node = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    node.verify_directly_issued_by(ca)
    names = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    for key in (certs.key, tmp_path / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    context = ssl.create_default_context(cafile=str(certs.ca))  # what a client does
    context.load_cert_chain(certs.cert, certs.key)              # what a server does


def test_certificates_are_reused_while_good(tmp_path: Path) -> None:
    first = ensure_mesh_certs(tmp_path, NOW)
    before = (first.ca.read_bytes(), first.cert.read_bytes(), first.key.read_bytes())
    again = ensure_mesh_certs(tmp_path, NOW + datetime.timedelta(days=30))
    assert (again.ca.read_bytes(), again.cert.read_bytes(), again.key.read_bytes()) == before


def test_a_node_certificate_near_its_end_is_remade_by_the_same_ca(tmp_path: Path) -> None:
    first = ensure_mesh_certs(tmp_path, NOW)
    ca_before, node_before = first.ca.read_bytes(), first.cert.read_bytes()
    old = x509.load_pem_x509_certificate(node_before)
    later = old.not_valid_after_utc - RENEW_BEFORE + datetime.timedelta(days=1)
    again = ensure_mesh_certs(tmp_path, later)
    assert again.ca.read_bytes() == ca_before and again.cert.read_bytes() != node_before
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca_before))


def test_a_node_certificate_from_another_ca_is_replaced(tmp_path: Path) -> None:
    mine = ensure_mesh_certs(tmp_path / "mine", NOW)
    other = ensure_mesh_certs(tmp_path / "other", NOW)
    mine.cert.write_bytes(other.cert.read_bytes())
    ensure_mesh_certs(tmp_path / "mine", NOW)
    x509.load_pem_x509_certificate(mine.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(mine.ca.read_bytes()))


def test_the_local_record_carries_the_certificates(tmp_path: Path) -> None:
    certs = MeshCerts(Path("/d/tls/ca.pem"), Path("/d/tls/node.pem"), Path("/d/tls/key.pem"))
    LocalMesh("https://127.0.0.1:2379", 9443, certs).write(tmp_path)
    mesh = read_local_mesh(tmp_path)
    assert mesh == LocalMesh("https://127.0.0.1:2379", 9443, certs)
    assert mesh.api_url == "https://localhost:9443/v1"
    (tmp_path / "mesh.json").write_text('{"etcd": "http://e:1", "port": 9337}')  # older `up`
    older = read_local_mesh(tmp_path)
    assert older is not None and older.api_url == "http://localhost:9337/v1"
    assert older.ssl_context() is None
    (tmp_path / "mesh.json").write_text('{"etcd": "http://e:1", "port": 1, "tls": {"ca": 1}}')
    with pytest.raises(InvalidRecord, match="tls must name"):
        read_local_mesh(tmp_path)


def test_etcd_over_tls_gets_every_flag_for_clients_and_peer() -> None:
    certs = MeshCerts(Path("ca.pem"), Path("node.pem"), Path("key.pem"))
    flags = etcd_tls_flags(certs)
    for prefix in ("--", "--peer-"):
        assert flags[flags.index(f"{prefix}cert-file") + 1] == "node.pem"
        assert flags[flags.index(f"{prefix}key-file") + 1] == "key.pem"
        assert flags[flags.index(f"{prefix}trusted-ca-file") + 1] == "ca.pem"
        assert f"{prefix}client-cert-auth" in flags
    assert etcd_tls_flags(None) == []


def test_an_https_etcd_needs_the_mesh_certificate() -> None:
    with pytest.raises(ConfigError, match="MESHLLM_TLS"):
        EtcdStore("https://127.0.0.1:2379")
    EtcdStore("http://127.0.0.1:2379")  # plaintext needs nothing


def test_gateway_https_needs_both_files_that_load(tmp_path: Path) -> None:
    certs = ensure_mesh_certs(tmp_path, datetime.datetime.now(datetime.UTC))
    cfg = load_config(["--https-cert", str(certs.cert), "--https-key", str(certs.key)], {})
    assert cfg.https is not None and cfg.https.cert == certs.cert
    assert load_config([], {}).https is None
    with pytest.raises(ConfigError, match="MESHLLM_HTTPS_KEY"):
        load_config(["--https-cert", str(certs.cert)], {})
    with pytest.raises(ConfigError, match="cannot load"):
        load_config([], {"MESHLLM_HTTPS_CERT": str(certs.cert),
                         "MESHLLM_HTTPS_KEY": str(tmp_path / "ca-key.pem")})  # not its key

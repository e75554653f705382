"""TLS settings: all three files or none, and a bad file fails at start-up naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.common.errors import ConfigError
from meshllm.common.tls import PLAINTEXT, security_from

from tests.support.certs import make_node


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    node = make_node(tmp_path_factory.mktemp("certs"))
    broken = node.cert.parent / "not-pem.txt"
    broken.write_text("hello")
    return {"cert": str(node.cert), "key": str(node.key), "ca": str(node.ca),
            "missing": str(node.cert.parent / "absent.pem"), "broken": str(broken)}


@pytest.mark.parametrize(("cert", "key", "ca", "problem"), [
    ("", "", "", ""),
    ("cert", "key", "ca", ""),
    ("cert", "", "", "--tls-key / MESHLLM_TLS_KEY, --tls-ca / MESHLLM_TLS_CA"),
    ("", "key", "ca", "--tls-cert / MESHLLM_TLS_CERT"),
    ("missing", "key", "ca", "--tls-cert / MESHLLM_TLS_CERT: cannot read"),
    ("cert", "key", "broken", "--tls-ca / MESHLLM_TLS_CA: .* is not a PEM file"),
])
def test_security_from(files: dict[str, str], cert: str, key: str, ca: str,
                       problem: str) -> None:
    values = {"tls_cert": files.get(cert, ""), "tls_key": files.get(key, ""),
              "tls_ca": files.get(ca, ""), "tls_server_name": ""}
    if problem:
        with pytest.raises(ConfigError, match=problem):
            security_from(values)
        return
    security = security_from(values)
    assert security.tls == bool(cert)
    if not cert:
        assert security == PLAINTEXT
    else:
        assert security.cert_chain == Path(files["cert"]).read_bytes()

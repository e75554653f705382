"""One real local mesh whose services export traces to an in-test OTLP collector and
serve Prometheus metrics; shared by the observability tests of this folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.observability.collector import Collector
from tests.support.mesh import LocalMesh, MeshOptions
from tests.support.procs import free_port

METRICS_PORT = "MESHLLM_METRICS_PORT"


class ObservedMesh(LocalMesh):
    """A LocalMesh whose planner and workers each serve metrics on a port of their own."""

    metrics_ports: dict[str, int]

    def start_worker(self, name: str) -> None:
        # Services read MESHLLM_METRICS_PORT when they start: set it for this worker only.
        port = self.metrics_ports.setdefault(name, free_port())
        previous = os.environ.get(METRICS_PORT)
        os.environ[METRICS_PORT] = str(port)
        try:
            super().start_worker(name)
        finally:
            if previous is None:
                del os.environ[METRICS_PORT]
            else:
                os.environ[METRICS_PORT] = previous


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def observed_mesh(tmp_path_factory: pytest.TempPathFactory, collector: Collector
                  ) -> Iterator[ObservedMesh]:
    mesh = ObservedMesh(tmp_path_factory.mktemp("observed"), MeshOptions(workers=2))
    mesh.metrics_ports = {"planner": free_port()}
    with pytest.MonkeyPatch.context() as env:  # inherited by every service process
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
        env.setenv(METRICS_PORT, str(mesh.metrics_ports["planner"]))
        try:
            mesh.start()
            yield mesh
        finally:
            mesh.stop()

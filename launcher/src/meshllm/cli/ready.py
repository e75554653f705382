"""Waiting for a local mesh to be ready: polls the gateway's status and prints each
model's progress as it changes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from meshllm.cli.local_mesh import LocalMesh
from meshllm.cli.output import say
from meshllm.cli.procs import ProcessGroup
from meshllm.common.errors import MeshError
from meshllm.common.status import ABSENT, MeshStatus, ModelStatus, ServingState, StageStatus
from meshllm.common.types import LoadState


def fetch_status(mesh: LocalMesh, api_key: str = "") -> MeshStatus | None:
    """The gateway's status; None while it does not answer (still starting). A document
    that does not parse raises InvalidRecord: the gateway is ours, so that is a bug."""
    url = mesh.base_url + "/api/status"
    request = urllib.request.Request(url, headers=(
        {"Authorization": f"Bearer {api_key}"} if api_key else {}))
    try:
        with urllib.request.urlopen(request, timeout=2, context=mesh.ssl_context()) as r:
            document = json.load(r)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return MeshStatus.from_json(document)


def _stage_state(stage: StageStatus) -> str:
    state = stage.state.value if stage.state else ABSENT
    if stage.state is not LoadState.LOADING or not stage.phase:
        return state
    percent = f" {stage.progress:.0%}" if stage.progress else ""
    return f"{stage.phase}{percent}"


def progress_line(status: MeshStatus) -> str:
    parts = []
    for model in status.models:
        states = ", ".join(f"{s.worker_id} {_stage_state(s)}"
                           for r in model.replicas for s in r.stages)
        parts.append(f"{model.model_id}: {model.status_text}" + (f" ({states})" if states else ""))
    return "; ".join(parts) or "waiting for the planner"


# The planner re-plans (debounced) when a worker registers: a refusal seen once may be
# from before the last one did. One that holds this long on the whole mesh is its answer.
REFUSAL_SETTLE_S = 3.0


def all_models_decided(status: MeshStatus, models: int, workers: int = 0) -> bool:
    """Every model is serving somewhere, or the planner said plainly why it cannot be
    once the `workers` `up` started are all registered (before that, "no worker is
    registered" or "too little memory" may be about a mesh still starting)."""
    if len(status.models) < models or not all(m.decided for m in status.models):
        return False
    return len(status.nodes) >= workers or not unserved(status)


def wait_ready(group: ProcessGroup, mesh: LocalMesh, models: int, timeout_s: float,
               api_key: str = "", workers: int = 0) -> MeshStatus:
    deadline = time.monotonic() + timeout_s
    last, refused_since = "", None
    while time.monotonic() < deadline:
        if dead := group.dead():
            child = dead[0]
            raise MeshError(f"{child.name} exited with code {child.popen.returncode}:\n"
                            f"{child.log_tail()}\n(full log: {child.log_path})")
        status = fetch_status(mesh, api_key)
        line = progress_line(status) if status else "starting services"
        if line != last:
            say(f"  {line}")
            last = line
        decided = status is not None and all_models_decided(status, models, workers)
        if status is not None and decided and not unserved(status):
            return status
        refused_since = (refused_since or time.monotonic()) if decided else None
        if status is not None and refused_since is not None \
                and time.monotonic() - refused_since >= REFUSAL_SETTLE_S:
            return status
        time.sleep(0.5)
    raise MeshError(f"the mesh was not ready within {timeout_s:.0f}s; "
                    f"logs are in {group.log_dir}")


def unserved(status: MeshStatus) -> tuple[ModelStatus, ...]:
    return tuple(m for m in status.models if m.state is ServingState.NOT_SERVED)


def readiness_lines(status: MeshStatus, url: str) -> list[str]:
    """What `up` says once every model is decided: plainly `Ready:` only when every model
    is served, else which are not and why (a gateway with nothing to serve is no ready
    mesh)."""
    missing = unserved(status)
    if not missing:
        return [f"Ready: {url}   (Ctrl-C stops the mesh)"]
    return [*(f"Ready, but {m.model_id} is not served: {_why(m)}" for m in missing),
            f"  the gateway answers at {url}   (Ctrl-C stops the mesh)"]


def _why(model: ModelStatus) -> str:
    # The planner's reason names the model first ("gemma3-270m needs 625.4 MiB ...").
    named = f"{model.model_id} "
    reason = model.unplaced_reason
    return reason[len(named):] if reason.startswith(named) else reason

"""An expert shard sent between workers (FetchShard): the receiver's writer and its checks
(table tests), the wire conversion, and real gRPC streams on loopback from the real
serving code: a peer that breaks off mid-transfer, a sender process SIGKILLed
mid-transfer, and a peer that corrupts a byte."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from meshllm.common import convert_shards
from meshllm.common.errors import InvalidRecord
from meshllm.common.models import describe
from meshllm.common.shard_transfer import ShardChunk, ShardRequest
from meshllm.common.types import ModelSpec, WorkerId
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.shard_receive import CorruptShardTransfer, ShardTransferFailed, ShardWriter
from meshllm.worker.shard_receive import fetch_shard as fetch
from meshllm.worker.shard_serve import shard_chunks
from meshllm.worker.shard_source import PeerHolding
from meshllm.worker.shard_supply import ShardSupply, obtain_shard
from meshllm.worker.shards import ensure_shard, shard_path

from tests.support.moe_gguf import MoeSpec, moe_model

SELECTION = ((0, 2, 5),) * 3
REPO = Path(__file__).resolve().parents[2]
SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


@dataclass(frozen=True)
class WriterCase:
    why: str
    chunks: tuple[ShardChunk, ...]
    error: str  # "": the file is kept, whole
    kept: bool = False  # the file stays though an error came (it was verified before)


WRITER_CASES = [
    WriterCase("whole, with keep-alives while the peer cuts", (
        ShardChunk(), ShardChunk(b"ab", 3), ShardChunk(b"c"), ShardChunk(sha256=SHA_ABC)), ""),
    WriterCase("a wrong sha256", (ShardChunk(b"abc", 3), ShardChunk(sha256="0" * 64)),
               "sha256"),
    WriterCase("short of the size announced", (ShardChunk(b"ab", 3),
                                                ShardChunk(sha256=SHA_ABC)), "2 of 3 bytes"),
    WriterCase("more than the size announced", (ShardChunk(b"ab", 1),), "more than the 1"),
    WriterCase("data before the size", (ShardChunk(b"abc"),), "before the file's size"),
    WriterCase("the size changing", (ShardChunk(b"a", 3), ShardChunk(b"b", 4)), "changed"),
    WriterCase("an end with no data", (ShardChunk(sha256=SHA_ABC),), "0 of 0 bytes"),
    WriterCase("a message after the end", (ShardChunk(b"abc", 3), ShardChunk(sha256=SHA_ABC),
                                           ShardChunk(b"d")), "after the last", kept=True),
]


@pytest.mark.parametrize("case", WRITER_CASES, ids=[c.why for c in WRITER_CASES])
def test_the_writer_keeps_only_a_verified_file(case: WriterCase, tmp_path: Path) -> None:
    path = tmp_path / "shards" / "x.gguf"
    writer = ShardWriter(path)
    try:
        if case.error:
            with pytest.raises(CorruptShardTransfer, match=case.error):
                for chunk in case.chunks:
                    writer.accept(chunk)
        else:
            assert [writer.accept(c) for c in case.chunks] == [False, False, False, True]
    finally:
        writer.discard()
    kept = sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []
    whole = case.kept or not case.error
    assert kept == (["x.gguf"] if whole else [])  # no temporary left either way
    if whole:
        assert path.read_bytes() == b"abc"


def test_the_wire_refuses_bad_requests_and_chunks() -> None:
    good = ShardRequest(WorkerId("m"), "a" * 64, ((1, 2), (3, 4)), "w")  # type: ignore[arg-type]
    assert convert_shards.shard_request_from_pb(convert_shards.shard_request_to_pb(good)) == good
    for bad, why in ((ShardRequest(good.model_id, "xyz", good.experts), "model_digest"),
                     (ShardRequest(good.model_id, good.model_digest, ()), "no experts"),
                     (ShardRequest(good.model_id, good.model_digest, ((1, 1),)), "twice")):
        with pytest.raises(InvalidRecord, match=why):
            convert_shards.shard_request_from_pb(convert_shards.shard_request_to_pb(bad))
    with pytest.raises(InvalidRecord, match="closing"):
        convert_shards.shard_chunk_from_pb(worker_pb2.ShardChunk(data=b"x", sha256=SHA_ABC))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moe_model(tmp_path_factory.mktemp("moe-transfer"), MoeSpec())


@pytest.fixture(scope="module")
def spec(model: Path) -> ModelSpec:
    return describe(str(model), 512)


Tamper = Callable[[int, ShardChunk], ShardChunk | None]  # (index, chunk) -> sent (None: die)


class Peer(worker_pb2_grpc.ShardWorkerServicer):
    """The real serving code (shard_chunks) behind gRPC, optionally tampered with."""

    def __init__(self, spec: ModelSpec, data_dir: Path, tamper: Tamper | None = None) -> None:
        self.spec, self.data_dir, self.tamper, self.asked = spec, data_dir, tamper, 0

    async def FetchShard(self, request: worker_pb2.FetchShardRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.ShardChunk]:
        self.asked += 1
        chunks = shard_chunks(self.spec, convert_shards.shard_request_from_pb(request),
                              self.data_dir)
        index = 0
        async for chunk in chunks:
            sent = chunk if self.tamper is None else self.tamper(index, chunk)
            if sent is None:  # as a worker killed mid-stream: the call breaks
                await context.abort(grpc.StatusCode.UNAVAILABLE, "peer went away")
                return
            yield convert_shards.shard_chunk_to_pb(sent)
            index += 1


async def serve(peer: Peer) -> tuple[grpc.aio.Server, PeerHolding]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, PeerHolding(WorkerId(f"peer-{port}"), f"127.0.0.1:{port}", False, True)


def request(spec: ModelSpec) -> ShardRequest:
    return ShardRequest(spec.model_id, spec.model_digest, SELECTION, "receiver")


async def test_a_received_shard_is_byte_identical_to_one_cut_locally(
        model: Path, spec: ModelSpec, tmp_path: Path) -> None:
    server, holding = await serve(Peer(spec, tmp_path / "peer"))
    seen: list[float] = []
    try:
        path = shard_path(tmp_path / "me", spec.model_digest, SELECTION)
        got = await fetch([holding], request(spec), path, seen.append)
    finally:
        await server.stop(None)
    local = ensure_shard(model, tmp_path / "local", SELECTION)
    assert got.received and got.path == path and got.file_bytes == local.file_bytes
    assert path.read_bytes() == local.path.read_bytes()
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def die_at(n: int) -> Tamper:
    return lambda i, chunk: None if i == n else chunk


def flip_a_byte(i: int, chunk: ShardChunk) -> ShardChunk:
    if i != 3:
        return chunk
    return ShardChunk(bytes([chunk.data[0] ^ 1]) + chunk.data[1:], chunk.total_bytes)


async def test_a_peer_dying_mid_transfer_hands_over_to_the_next(
        spec: ModelSpec, tmp_path: Path) -> None:
    dying, good = Peer(spec, tmp_path / "dying", die_at(5)), Peer(spec, tmp_path / "good")
    (s1, h1), (s2, h2) = await serve(dying), await serve(good)
    path = shard_path(tmp_path / "me", spec.model_digest, SELECTION)
    try:
        got = await fetch([h1, h2], request(spec), path, lambda f: None)
    finally:
        await s1.stop(None)
        await s2.stop(None)
    assert (dying.asked, good.asked) == (1, 1) and got.path.is_file()
    assert path.read_bytes() == shard_path(tmp_path / "good", spec.model_digest,
                                           SELECTION).read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


async def test_a_corrupted_transfer_is_never_kept(spec: ModelSpec, tmp_path: Path) -> None:
    (s1, h1), (s2, h2) = (await serve(Peer(spec, tmp_path / "bad", flip_a_byte)),
                          await serve(Peer(spec, tmp_path / "dead", die_at(0))))
    path = shard_path(tmp_path / "me", spec.model_digest, SELECTION)
    try:
        with pytest.raises(ShardTransferFailed) as failed:
            await fetch([h1, h2], request(spec), path, lambda f: None)
    finally:
        await s1.stop(None)
        await s2.stop(None)
    message = str(failed.value)
    assert "sha256" in message and "went away" in message and "model file readable" in message
    assert not path.parent.exists() or list(path.parent.iterdir()) == []


async def test_a_peer_without_the_file_says_so(spec: ModelSpec, tmp_path: Path) -> None:
    elsewhere = ModelSpec(**{**spec.__dict__, "source": str(tmp_path / "absent.gguf")})
    server, holding = await serve(Peer(elsewhere, tmp_path / "peer"))
    try:
        with pytest.raises(ShardTransferFailed, match="neither the shard nor the file"):
            await fetch([holding], request(spec), tmp_path / "x.gguf", lambda f: None)
    finally:
        await server.stop(None)


async def test_no_file_and_no_peer_fails_saying_what_to_do(spec: ModelSpec,
                                                            tmp_path: Path) -> None:
    elsewhere = ModelSpec(**{**spec.__dict__, "source": str(tmp_path / "absent.gguf")})
    phases: list[str] = []
    supply = ShardSupply(tmp_path / "me", peer_wait_s=0.0)
    with pytest.raises(ShardTransferFailed, match="put the model file"):
        await obtain_shard(elsewhere, SELECTION, supply, lambda phase, f: phases.append(phase))
    assert phases == []  # nothing was cut or received


async def test_a_worker_without_the_file_receives_from_its_peer(spec: ModelSpec,
                                                                 tmp_path: Path) -> None:
    elsewhere = ModelSpec(**{**spec.__dict__, "source": str(tmp_path / "absent.gguf")})
    server, holding = await serve(Peer(spec, tmp_path / "peer"))
    phases: list[tuple[str, float]] = []
    supply = ShardSupply(tmp_path / "me", "me", lambda digest, name: [holding])
    try:
        got = await obtain_shard(elsewhere, SELECTION, supply,
                                 lambda phase, f: phases.append((phase, f)))
        again = await obtain_shard(elsewhere, SELECTION, supply, lambda phase, f: None)
    finally:
        await server.stop(None)
    assert got.received and phases[0] == ("receiving expert shard", 0.0)
    assert phases[-1] == ("receiving expert shard", 1.0)
    assert (again.built, again.path) == (False, got.path)  # from the cache, no transfer


async def test_a_sender_killed_mid_transfer_hands_over_to_the_next(
        model: Path, spec: ModelSpec, tmp_path: Path) -> None:
    """A real process sending the shard slowly, SIGKILLed once a tenth has arrived."""
    sender = subprocess.Popen(
        [sys.executable, "-m", "tests.support.shard_peer", str(model), str(tmp_path / "slow"),
         "--delay-s", "0.05"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    server, good = await serve(Peer(spec, tmp_path / "good"))
    killed_at: list[float] = []

    def progress(fraction: float) -> None:
        if fraction > 0.1 and not killed_at:
            killed_at.append(fraction)
            sender.kill()

    try:
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        dying = PeerHolding(WorkerId("dying"), f"127.0.0.1:{port}", False, True)
        path = shard_path(tmp_path / "me", spec.model_digest, SELECTION)
        got = await fetch([dying, good], request(spec), path, progress)
    finally:
        sender.kill()
        sender.wait()
        await server.stop(None)
    assert killed_at and killed_at[0] < 0.5 and sender.returncode == -signal.SIGKILL
    assert got.path.read_bytes() == ensure_shard(model, tmp_path / "local",
                                                 SELECTION).path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]

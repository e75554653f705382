"""The demand records gateways publish: their wire form, validation, and how the planner
merges several gateways' figures for one model."""

from __future__ import annotations

import math

import pytest
from meshllm.common.demand import (
    GatewayDemand,
    ModelDemand,
    demand_to_pb,
    merged,
    parse_demand,
)
from meshllm.common.errors import InvalidRecord
from meshllm.common.types import ModelId
from meshllm.v1 import mesh_pb2

A, B = ModelId("a"), ModelId("b")


@pytest.mark.parametrize("record", [
    GatewayDemand("g1", 1.5e9),
    GatewayDemand("g1", 1.5e9, (ModelDemand(A, 60.0, 2.0, 0.5, 1.2, 0.3, 40.0, 3.0, 10.0,
                                            4.0, 2),), 60.0),
    GatewayDemand("g2", 0.0, (ModelDemand(A), ModelDemand(B, idle_s=math.inf)), 12.5),
])
def test_round_trip(record: GatewayDemand) -> None:
    assert parse_demand(demand_to_pb(record).SerializeToString()) == record


@pytest.mark.parametrize(("message", "problem"), [
    (mesh_pb2.GatewayDemand(), "without gateway_id"),
    (mesh_pb2.GatewayDemand(gateway_id="g", models=[mesh_pb2.ModelDemand()]),
     "without model_id"),
    (mesh_pb2.GatewayDemand(gateway_id="g", models=[
        mesh_pb2.ModelDemand(model_id="a", requests_per_s=-1)]), "requests_per_s"),
    (mesh_pb2.GatewayDemand(gateway_id="g", models=[
        mesh_pb2.ModelDemand(model_id="a", mean_service_s=math.nan)]), "mean_service_s"),
    (mesh_pb2.GatewayDemand(gateway_id="g", window_s=math.inf), "window_s"),
])
def test_invalid_records_are_refused(message: mesh_pb2.GatewayDemand, problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        parse_demand(message.SerializeToString())


def test_undecodable_bytes_are_refused() -> None:
    with pytest.raises(InvalidRecord, match="undecodable"):
        parse_demand(b"\xff\xff\xff")


def test_two_gateways_add_up_and_weigh_their_means_by_requests() -> None:
    one = GatewayDemand("g1", 0.0, (ModelDemand(A, 60.0, 3.0, 1.0, 2.0, 1.0, 30.0, 3.0,
                                                10.0, 1.0, 1),), 60.0)
    two = GatewayDemand("g2", 0.0, (ModelDemand(A, 20.0, 1.0, 0.0, 6.0, 5.0, 10.0, 2.0,
                                                10.0, 0.5, 0),), 20.0)
    (a,) = merged([one, two]).values()
    assert (a.requests_per_s, a.refused_per_s, a.generated_tokens_per_s) == (4.0, 1.0, 40.0)
    assert a.mean_service_s == pytest.approx((2.0 * 3 + 6.0 * 1) / 4)
    assert a.mean_queue_wait_s == pytest.approx((1.0 * 3 + 5.0 * 1) / 4)
    assert (a.window_s, a.idle_s, a.waiting_requests) == (20.0, 0.5, 1)  # the youngest


@pytest.mark.parametrize(("records", "declared", "expected"), [
    ([], [A], {}),  # no gateway: nothing is known
    ([GatewayDemand("g", 0.0, (), 45.0)], [A], {A: ModelDemand(A, window_s=45.0)}),
    ([GatewayDemand("g", 0.0, (ModelDemand(B, 60.0, 1.0),), 60.0)], [A, B],
     {A: ModelDemand(A, window_s=60.0), B: ModelDemand(B, 60.0, 1.0)}),
])
def test_a_declared_model_no_gateway_lists_had_no_request(
        records: list[GatewayDemand], declared: list[ModelId],
        expected: dict[ModelId, ModelDemand]) -> None:
    assert merged(records, declared) == expected

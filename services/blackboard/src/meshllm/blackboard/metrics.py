"""Prometheus metrics of one node, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.posts_accepted = Counter(
            "meshllm_blackboard_posts_accepted", "Posts accepted from clients here", registry=r)
        self.posts_rejected = Counter(
            "meshllm_blackboard_posts_rejected", "Posts refused, by reason", ["reason"],
            registry=r)
        self.posts_ingested = Counter(
            "meshllm_blackboard_posts_ingested", "New posts learnt from peers", registry=r)
        self.posts_expired = Counter(
            "meshllm_blackboard_posts_expired", "Posts dropped by retention", registry=r)
        self.push_dropped = Counter(
            "meshllm_blackboard_push_dropped", "Pushes dropped (peer slow or down)", ["peer"],
            registry=r)
        self.anti_entropy_rounds = Counter(
            "meshllm_blackboard_anti_entropy_rounds", "Anti-entropy rounds, by outcome",
            ["outcome"], registry=r)
        self.anti_entropy_fetched = Counter(
            "meshllm_blackboard_anti_entropy_fetched", "Posts fetched by anti-entropy",
            registry=r)
        self.anti_entropy_seconds = Histogram(
            "meshllm_blackboard_anti_entropy_seconds", "Duration of one anti-entropy round",
            registry=r)
        self.gossip_lag_seconds = Histogram(
            "meshllm_blackboard_gossip_lag_seconds",
            "From a post's creation on its origin node to its arrival here", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.peers = Gauge("meshllm_blackboard_peers", "Peers known", registry=r)
        self.posts_stored = Gauge("meshllm_blackboard_posts_stored", "Posts held", registry=r)

"""Prometheus metrics of one node, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from collections.abc import Callable

from meshllm.common import lifecycle
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
        self.links_broken = Counter(
            "meshllm_blackboard_gossip_links_broken",
            "Push streams to a peer that broke while up (peer crashed, restarted, cut off)",
            ["peer"], registry=r)
        self.links_reestablished = Counter(
            "meshllm_blackboard_gossip_links_reestablished",
            "Push streams to a peer opened again after breaking", ["peer"], registry=r)
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
        self.lease_ok = Gauge("meshllm_blackboard_etcd_lease_ok",
                              "1 while the node's etcd lease is held", registry=r)
        self._add_background_metrics(r)

    def _add_background_metrics(self, r: CollectorRegistry) -> None:
        """Of the supervised background tasks, and of the embedding one in particular."""
        self.task_restarts = lifecycle.restart_counter("blackboard", r)
        self.posts_embedded = Counter(
            "meshllm_blackboard_posts_embedded", "Posts given a vector here", registry=r)
        self.embed_failures = Counter(
            "meshllm_blackboard_embed_failures",
            "Embedding batches no worker answered (retried with backoff)", registry=r)
        self.embed_seconds = Histogram(
            "meshllm_blackboard_embed_seconds", "Duration of one Embed call to a worker",
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def watch_lease(self, lease_ok: Callable[[], bool]) -> None:
        self.lease_ok.set_function(lambda: float(lease_ok()))

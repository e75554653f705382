"""Continuous batching engine: many requests share one llama.cpp context (issue 7)."""

from meshllm.worker.batch.config import BatchConfig, SpecMode
from meshllm.worker.batch.core import BatchEngine
from meshllm.worker.batch.errors import BatchEngineError, DecodeFailed, QueueFull
from meshllm.worker.batch.events import Delta, EngineStats, Event, Failed, Finished

__all__ = [
    "BatchConfig", "BatchEngine", "BatchEngineError", "DecodeFailed", "Delta", "EngineStats",
    "Event", "Failed", "Finished", "QueueFull", "SpecMode",
]

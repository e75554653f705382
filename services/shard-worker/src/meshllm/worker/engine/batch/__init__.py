"""Continuous batching engine: many requests share one llama.cpp context (issue 7).

It runs inside the engine process only; nothing here imports the worker service."""

from meshllm.worker.engine.batch.config import BatchConfig, SpecMode
from meshllm.worker.engine.batch.core import BatchEngine
from meshllm.worker.engine.batch.errors import BatchEngineError, DecodeFailed, QueueFull
from meshllm.worker.engine.batch.events import Delta, EngineStats, Event, Failed, Finished
from meshllm.worker.engine.batch.load_options import LoadOptions, Offload

__all__ = [
    "BatchConfig", "BatchEngine", "BatchEngineError", "DecodeFailed", "Delta", "EngineStats",
    "Event", "Failed", "Finished", "LoadOptions", "Offload", "QueueFull", "SpecMode",
]

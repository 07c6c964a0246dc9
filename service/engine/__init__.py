"""The engine: one loop, on its own thread, that runs one forward pass per step for every running sequence
(continuous batching over a paged KV cache) and samples through sampler_rs."""

from .engine import (
    BeamSettings,
    Engine,
    EngineConfig,
    EngineRequest,
    FinishReason,
    QueueFull,
    SequenceHandle,
    StepEvent,
    TokenInfo,
    TooLarge,
)

__all__ = [
    "BeamSettings",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "FinishReason",
    "QueueFull",
    "SequenceHandle",
    "StepEvent",
    "TokenInfo",
    "TooLarge",
]

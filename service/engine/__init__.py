"""The engine: one loop, on its own thread, that steps every running sequence and samples through sampler_rs."""

from .engine import BeamSettings, Engine, EngineRequest, FinishReason, QueueFull, SequenceHandle, StepEvent, TokenInfo

__all__ = [
    "BeamSettings",
    "Engine",
    "EngineRequest",
    "FinishReason",
    "QueueFull",
    "SequenceHandle",
    "StepEvent",
    "TokenInfo",
]

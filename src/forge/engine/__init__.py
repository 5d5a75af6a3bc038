"""Generation engines behind one interface: the native PyTorch engine and a vLLM adapter."""

from forge.engine.config import EngineConfig, SamplingParams

__all__ = ["EngineConfig", "SamplingParams"]

"""Generation engines behind one interface (``GenerationEngine``): the native PyTorch
engine and a vLLM adapter; ``build_engine`` makes the one an ``EngineConfig`` names."""

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.interface import GenerationEngine, build_engine

__all__ = ["EngineConfig", "SamplingParams", "GenerationEngine", "build_engine"]

"""Models and tokenizers: local Hugging Face directories, the HF cache, embedded presets."""

from forge.models.loading import load_model, load_tokenizer, resolve_model_path
from forge.models.presets import PRESETS, build_tokenizer, materialize

__all__ = ["PRESETS", "build_tokenizer", "load_model", "load_tokenizer", "materialize", "resolve_model_path"]

"""Models and tokenizers: local Hugging Face directories, the HF cache, embedded presets."""

from forge.models.export import export_hf_directory
from forge.models.loading import load_model, load_tokenizer, padding_token_id, resolve_model_path, torch_dtype
from forge.models.presets import PRESETS, build_tokenizer, materialize

__all__ = ["PRESETS", "build_tokenizer", "export_hf_directory", "load_model", "load_tokenizer", "materialize",
           "padding_token_id", "resolve_model_path", "torch_dtype"]

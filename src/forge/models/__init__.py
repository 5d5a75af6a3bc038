"""Models and tokenizers: local Hugging Face directories, the HF cache, embedded presets."""

from forge.models.export import export_hf_directory
from forge.models.loading import load_model, load_tokenizer, padding_token_id, resolve_model_path, torch_dtype
from forge.models.presets import PRESETS, build_tokenizer, materialize
from forge.models.tokenizer import TextTokenizer, load_text_tokenizer

__all__ = ["PRESETS", "TextTokenizer", "build_tokenizer", "export_hf_directory", "load_model", "load_text_tokenizer",
           "load_tokenizer", "materialize", "padding_token_id", "resolve_model_path", "torch_dtype"]

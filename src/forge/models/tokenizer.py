"""A tokenizer that needs only the ``tokenizers`` library, for processes that must start fast.

``transformers.AutoTokenizer`` costs about 1.2 s of CPU to import on top of torch; a
generator replica that runs Forge's decoder would import transformers for its tokenizer
alone. When a model directory's tokenizer is exactly its ``tokenizer.json`` (the
generic ``PreTrainedTokenizerFast`` / ``TokenizersBackend`` classes, which add no Python
behaviour of their own, for a model type transformers does not override, with no
tokenizer_config.json setting that rebuilds the pipeline), ``TextTokenizer`` runs that
file with ``tokenizers`` and gives the same ids and text as transformers. Any other tokenizer class (a model-specific one
may rewrite the pipeline in Python) is loaded with transformers, so ``load_text_tokenizer``
never changes what a model sees. Chat templates are rendered by transformers, imported
the first time one is applied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Model types whose declared tokenizer class transformers (5.23, MODELS_WITH_INCORRECT_HUB_
# TOKENIZER_CLASS) overrides with its own class for the type: a generic class declared in
# tokenizer_config.json does not mean the generic pipeline for these.
OVERRIDDEN_MODEL_TYPES = frozenset({
    "arctic", "chatlm", "ernie4_5", "ernie4_5_moe", "fuyu", "h2ovl_chat", "hyperclovax", "hyperclovax_vlm",
    "hyperclovax_vision_v2", "internlm2", "internlm3", "iquestcoder", "jamba", "llava", "llava_next", "minicpm3",
    "minicpmv", "minimax_m2", "modernbert", "modernbert-decoder", "molmo", "molmo2", "nemotron", "nvfp4",
    "opencua", "openvla", "paddleocr_vl", "phi3", "phi3_v", "phimoe", "qwen2", "qwen3_5", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen4_exp", "step3_vl", "vipllava", "cohere_asr", "camembertv2-base", "siglip2", "smolvlm"})
# tokenizer_config.json keys with which transformers changes the pipeline tokenizer.json describes.
PIPELINE_KEYS = ("add_bos_token", "add_eos_token", "split_special_tokens", "add_prefix_space", "legacy")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """The subset of a transformers tokenizer Forge's generator uses, over ``tokenizer.json``."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self._tokenizer.no_truncation()  # transformers encodes without either unless asked
        self._tokenizer.no_padding()
        config = json.loads((self.directory / "tokenizer_config.json").read_text())
        special_map = self.directory / "special_tokens_map.json"  # older directories name them here
        specials = json.loads(special_map.read_text()) if special_map.exists() else {}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for role in ("bos", "eos", "pad", "unk"):
            token = _token_text(config.get(f"{role}_token")) or _token_text(specials.get(f"{role}_token"))
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_token_id", None if token is None else self._tokenizer.token_to_id(token))
        self._chat_tokenizer: Any = None

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tokenizer.model).__name__ != "BPE":
            for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                   (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                                   (" 're", "'re")):  # transformers' clean_up_tokenization
                text = text.replace(spaced, joined)
        return text

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any:
        """transformers' rendering of the directory's chat template (imported on first use)."""
        if self._chat_tokenizer is None:
            from forge.models.loading import load_tokenizer

            self._chat_tokenizer = load_tokenizer(self.directory)
        return self._chat_tokenizer.apply_chat_template(messages, **kwargs)


def is_plain(directory: Path) -> bool:
    """Whether transformers would run the directory's tokenizer.json and nothing more: a
    generic class declared, honoured for the model type, and no setting that changes the
    pipeline at load time."""
    config_file, model_file = directory / "tokenizer_config.json", directory / "config.json"
    if not (directory / "tokenizer.json").exists() or not config_file.exists():
        return False
    config = json.loads(config_file.read_text())
    model_type = json.loads(model_file.read_text()).get("model_type") if model_file.exists() else None
    return (config.get("tokenizer_class") in PLAIN_CLASSES and model_type not in OVERRIDDEN_MODEL_TYPES
            and not any(key in config for key in PIPELINE_KEYS) and "auto_map" not in config)


def load_text_tokenizer(reference: str | os.PathLike) -> Any:
    """A ``TextTokenizer`` where that is exact (``is_plain``), else transformers' tokenizer."""
    from forge.models.loading import load_tokenizer, resolve_model_path

    directory = resolve_model_path(reference)
    return TextTokenizer(directory) if is_plain(directory) else load_tokenizer(directory)

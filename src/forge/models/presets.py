"""Embedded model presets: standard architectures, random init, a tokenizer built here.

No model can be downloaded where Forge must run, so the default run builds its own: a
named preset is a ``transformers`` Qwen3 config with a fixed seed plus a character-level
tokenizer for arithmetic-style tasks. ``materialize(name)`` writes it once as an ordinary
Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) so that
every actor loads the same files through the same code path as a real checkpoint.

``initializer_range`` is 0.2, not the usual 0.02: a tiny random policy with the standard
init is almost prompt-independent and GRPO then collapses to the most common answer
(README, "The default task, and why it is built this way", has the measurements).

A preset may pad its vocabulary (``vocab_size``) past the char tokenizer's: the extra ids
are never produced by the tokenizer, but the embedding and lm_head have a real model's
size, so a smoke run on a real architecture ("qwen3-1.7b-shape") costs the memory and time
of the real thing. ``dtype`` is what the weights are saved in (bfloat16 halves the 7 GB a
1.7B model takes in float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing presets stays free of transformers
    from transformers import PreTrainedTokenizerFast, Qwen3Config

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list("0123456789+-*=? \n")
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
)


@dataclass(frozen=True)
class Preset:
    """A Qwen3 architecture with the char tokenizer; sizes are Qwen3Config fields."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    initializer_range: float = 0.2
    seed: int = 0
    vocab_size: int | None = None  # None: the char tokenizer's; larger pads with ids it never produces
    dtype: str = "float32"  # of the saved weights

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < CHAR_VOCAB_SIZE:
            raise ValueError(f"preset vocab_size={self.vocab_size} is smaller than the char tokenizer's "
                             f"{CHAR_VOCAB_SIZE} tokens")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"preset dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


# Fields added after presets were first written, with their defaults: hashed only when set,
# so the directories of presets that leave them alone keep their names.
_HASHED_WHEN_SET = {"vocab_size": None, "dtype": "float32"}

PRESETS: dict[str, Preset] = {
    # ~0.1M parameters: the embedded default for the CPU GRPO run.
    "tiny": Preset(64, 2, 4, 2, 16, 256),
    # ~31M parameters: a mid-size model for engine benchmarks.
    "bench-30m": Preset(512, 10, 8, 4, 64, 1536, initializer_range=0.02),
    # Qwen3-1.7B's architecture and vocabulary size (~1.7B parameters), random weights: the
    # GPU smoke run (scripts/gpu_smoke.sh) measures speed and memory, not learning.
    "qwen3-1.7b-shape": Preset(2048, 28, 16, 8, 128, 6144, max_position_embeddings=4096,
                               initializer_range=0.02, vocab_size=151_936, dtype="bfloat16"),
}


def default_cache_dir() -> Path:
    """Where presets are written: ``$FORGE_CACHE_DIR`` or ``~/.cache/forge``."""
    return Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge"))


def build_tokenizer():
    """The character-level tokenizer of the presets (a PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _fingerprint(name: str, preset: Preset) -> str:
    fields = {key: value for key, value in asdict(preset).items()
              if key not in _HASHED_WHEN_SET or value != _HASHED_WHEN_SET[key]}
    blob = json.dumps({"name": name, "preset": fields, "chars": CHARACTERS, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of preset ``name``, written on first use (atomically, race-safe)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
    preset = PRESETS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"{name}-{_fingerprint(name, preset)}"
    if (target / "config.json").exists():
        return target
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root / "models"))
    try:
        _write_preset(preset, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its files are identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def preset_config(name: str) -> Qwen3Config:
    """The ``Qwen3Config`` preset ``name`` is built from (no weights)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
    return _qwen3_config(PRESETS[name], build_tokenizer())


def _qwen3_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=preset.vocab_size or len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.initializer_range,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=preset.dtype,
    )


def _write_preset(preset: Preset, directory: Path) -> None:
    import torch
    from transformers import Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = _qwen3_config(preset, tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(preset.seed)
        model = Qwen3ForCausalLM(config)  # initialized in float32 whatever the saved dtype
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(getattr(torch, preset.dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

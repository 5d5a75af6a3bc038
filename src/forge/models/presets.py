"""Embedded model presets: standard architectures, random init, a tokenizer built here.

No model can be downloaded where Forge must run, so the default run builds its own: a
named preset is a ``transformers`` Qwen3 config with a fixed seed plus a character-level
tokenizer for arithmetic-style tasks. ``materialize(name)`` writes it once as an ordinary
Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) so that
every actor loads the same files through the same code path as a real checkpoint.

``initializer_range`` is 0.2, not the usual 0.02: a tiny random policy with the standard
init is almost prompt-independent and GRPO then collapses to the most common answer
(README, "The default task, and why it is built this way", has the measurements).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list("0123456789+-*=? \n")
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


PRESETS: dict[str, Preset] = {
    # ~0.1M parameters: the embedded default for the CPU GRPO run.
    "tiny": Preset(64, 2, 4, 2, 16, 256),
    # ~31M parameters: a mid-size model for engine benchmarks.
    "bench-30m": Preset(512, 10, 8, 4, 64, 1536, initializer_range=0.02),
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
    blob = json.dumps({"name": name, "preset": asdict(preset), "chars": CHARACTERS, "v": 1}, sort_keys=True)
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


def _write_preset(preset: Preset, directory: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
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
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(preset.seed)
        model = Qwen3ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

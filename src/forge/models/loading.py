"""Resolve a model reference to a local directory and load it (Forge's decoder or ``transformers``).

A reference is one of:

* a preset name (``"tiny"``): built locally on first use (``forge.models.presets``);
* a local directory of a Hugging Face causal LM (Qwen2, Qwen3, Llama, ...);
* ``hf://org/name`` (or a bare ``org/name``): looked up in the local Hugging Face
  cache. Nothing is ever downloaded: if it is not cached, the error says how to point
  at a local directory instead.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from forge.models.presets import PRESETS, materialize

# Actors that share a process (forge.controller.ProcGroup) set up on threads of their own,
# and transformers' lazy imports are not thread-safe ("cannot import name
# AutoModelForCausalLM" when two threads import it at once): loads take turns per process.
_LOAD_LOCK = threading.RLock()

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _hub_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    if "HF_HOME" in os.environ:
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _from_hub_cache(repo_id: str) -> Path:
    repo_dir = _hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    candidates = []
    if ref.exists():
        candidates.append(repo_dir / "snapshots" / ref.read_text().strip())
    if (repo_dir / "snapshots").is_dir():
        candidates += sorted((repo_dir / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "config.json").exists():
            return snapshot
    raise ValueError(
        f"model {repo_id!r} is not in the local Hugging Face cache ({_hub_cache()}) and Forge never "
        "downloads. Copy or download it on a machine with network access, then either point at its "
        "directory (model='/path/to/model', the directory with config.json) or put it in the "
        "cache (HF_HUB_CACHE)."
    )


def resolve_model_path(reference: str | os.PathLike) -> Path:
    """The local directory that ``reference`` names (see the module docstring)."""
    text = str(reference)
    if text in PRESETS:
        with _LOAD_LOCK:  # building a preset imports transformers
            return materialize(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {path} has no config.json; is it a Hugging Face model directory?")
        return path
    if text.startswith("hf://"):
        return _from_hub_cache(text[len("hf://"):].strip("/"))
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _from_hub_cache(text)
    raise ValueError(
        f"model {text!r} is neither a preset ({sorted(PRESETS)}), a local directory, nor an "
        "hf://org/name reference"
    )


def torch_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(set(_DTYPES.values()))}")
    return getattr(torch, _DTYPES[name])


def load_tokenizer(reference: str | os.PathLike) -> Any:
    with _LOAD_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_model_path(reference), local_files_only=True)


def padding_token_id(reference: str | os.PathLike) -> int:
    """A token id to pad responses with, read from the model's ``config.json``: its
    ``pad_token_id``, else its (first) ``eos_token_id``, else 0.

    Padding is masked out of every loss and metric, so any id of the vocabulary serves; the
    config names one without importing ``transformers`` (about 1.5 s of CPU), which a
    client that only pads need not pay.
    """
    import json

    config = json.loads((resolve_model_path(reference) / "config.json").read_text())
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


MODEL_IMPLS = ("auto", "forge", "transformers")


def model_implementation(reference: str | os.PathLike, impl: str = "auto") -> str:
    """Which code runs the model: ``"forge"`` (``forge.models.decoder``, no transformers
    import) or ``"transformers"``. ``impl="auto"`` picks Forge's decoder whenever it runs the
    model exactly (Llama, Qwen2, Qwen3 with default RoPE, safetensors) and transformers
    otherwise; ``"forge"`` refuses a model it does not cover, naming why."""
    return _implementation(reference, impl)[0]


def _implementation(reference: str | os.PathLike, impl: str) -> tuple[str, dict[str, Any] | None]:
    """``model_implementation`` and, when it read it, the model's ``config.json``."""
    from forge.util.checks import check_choice

    check_choice("model impl", impl, MODEL_IMPLS)
    if impl == "transformers":
        return impl, None
    from forge.models.decoder import read_config, unsupported_reason, weight_files

    path = resolve_model_path(reference)
    raw = read_config(path)
    problem = unsupported_reason(raw)
    if problem is None and weight_files(path) is None:
        problem = "its weights are not safetensors"
    if problem is None:
        return "forge", raw
    if impl == "forge":
        raise ValueError(f"model impl 'forge' cannot run {path}: {problem}; set impl to 'auto' or 'transformers'")
    return "transformers", raw


def import_model_code(reference: str | os.PathLike, impl: str = "auto") -> str:
    """Import the code that will run the model now (safely while other threads of the
    process load too); returns ``model_implementation(reference, impl)``."""
    chosen = model_implementation(reference, impl)
    if chosen == "transformers":
        with _LOAD_LOCK:
            from transformers import AutoModelForCausalLM  # noqa: F401
    return chosen


def load_model(reference: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
               impl: str = "auto") -> Any:
    """A causal LM in eval mode on ``device``; weights from local files only.

    ``impl`` as in ``model_implementation``: Forge's decoder and transformers' classes have
    the same parameter names and compute the same logits, so either serves every caller."""
    chosen, raw = _implementation(reference, impl)
    if chosen == "forge":
        from forge.models.decoder import load_decoder

        return load_decoder(resolve_model_path(reference), torch_dtype(dtype), device, raw)
    with _LOAD_LOCK:
        return _load_model(reference, dtype, device)


def _load_model(reference: str | os.PathLike, dtype: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(reference)
    showed_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per actor process is noise on the console
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype(dtype))
    finally:
        if showed_bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()

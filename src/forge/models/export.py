"""Write a trained policy as a Hugging Face model directory.

The directory holds ``config.json`` (the dtype set to the one written), the weights as
safetensors (one file, or shards of at most ``max_shard_bytes`` with the usual
``model.safetensors.index.json``), and every non-weight file of the directory the model
started from: tokenizer files, chat template, generation config. So
``AutoModelForCausalLM.from_pretrained``, vLLM and Forge's ``Policy`` load it as they
load any checkpoint. The directory is built under a hidden staging name and renamed
into place, so a crash leaves either the previous export or the new one, never half.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _shards(tensors: dict[str, Any], max_shard_bytes: int) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def export_hf_directory(state_dict: Mapping[str, Any], config: Any, source_dir: Path, out_dir: Path,
                        dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``state_dict`` (Hugging Face names) with ``config`` (a ``PretrainedConfig``) as a
    model directory at ``out_dir``; tokenizer and generation files come from ``source_dir``."""
    from safetensors.torch import save_file

    from forge.models.loading import torch_dtype

    torch_type = torch_dtype(dtype)
    tensors = {name: t.detach().to("cpu", torch_type).contiguous() for name, t in state_dict.items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the embedding's; safetensors refuses shared storage
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(staging / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for item in Path(source_dir).iterdir():
            if item.is_file() and item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)
        config_dict = config.to_dict()
        config_dict["dtype"] = config_dict["torch_dtype"] = str(torch_type).removeprefix("torch.")
        config_dict.pop("use_cache", None)  # the trainer switches the KV cache off; a loader wants the default
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        for item in staging.iterdir():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        previous = out_dir.with_name(f".{out_dir.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if out_dir.exists():
            os.rename(out_dir, previous)
        os.rename(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

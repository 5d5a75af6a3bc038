"""The seeds' ``model={...}`` dict (name, flavor, hf_assets_path), typed and resolved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from forge.util.config import build


@dataclass(frozen=True)
class ModelSpec:
    """Which model to train or score.

    ``hf_assets_path`` (a local directory or ``hf://org/name`` in the local HF cache)
    wins; otherwise ``flavor`` must name an embedded preset (e.g. ``"tiny"``). ``name``
    is the architecture family, informational (``"qwen3"``).
    """

    name: str = "qwen3"
    flavor: str = "tiny"
    hf_assets_path: str | None = None
    dtype: str = "float32"
    impl: str = "auto"  # the code that runs it: "auto", "forge" (Forge's decoder) or "transformers"

    def __post_init__(self) -> None:
        from forge.models.loading import MODEL_IMPLS
        from forge.util.checks import check_choice

        check_choice("model impl", self.impl, MODEL_IMPLS)

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "ModelSpec" | None) -> "ModelSpec":
        return build(cls, values, "model")

    def path(self) -> Path:
        from forge.models import PRESETS, resolve_model_path

        if self.hf_assets_path:
            return resolve_model_path(self.hf_assets_path)
        if self.flavor in PRESETS:
            return resolve_model_path(self.flavor)
        raise ValueError(
            f"model flavor {self.flavor!r} is not an embedded preset ({sorted(PRESETS)}); set "
            "model.hf_assets_path to a local Hugging Face directory or hf://org/name in the local cache"
        )

"""Forge's own Llama-family decoder (Llama, Qwen2, Qwen3) in plain torch.

Every process that loads a model would otherwise import ``transformers`` and its model
classes: about 2.8 s of CPU on top of torch's 1.6 s, paid by the trainer and by every
generator replica before the first rollout. These few modules are the same computation
as transformers' ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` with
the same module and parameter names (``model.layers.0.self_attn.q_proj.weight``, ...),
so checkpoints, state dicts, weight sync, FSDP wrapping and the native engine's runner
see no difference; ``tests/unit/test_decoder.py`` compares logits and gradients with
transformers' classes.

What is covered: ``model_type`` llama, qwen2 or qwen3 with SiLU MLPs, default RoPE (no
scaling), full attention everywhere and safetensors weights. ``unsupported_reason``
names what a config has beyond that; ``forge.models.load_model`` then loads it with
transformers instead (or the user asks for that with ``model.impl``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class DecoderConfig:
    """The fields of a Hugging Face ``config.json`` this decoder reads; ``raw`` is the whole file."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    pad_token_id: int | None
    use_cache: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DecoderConfig":
        problem = unsupported_reason(raw)
        if problem:
            raise ValueError(f"Forge's decoder cannot run this model: {problem}")
        model_type = raw["model_type"]
        heads = raw["num_attention_heads"]
        attention_bias = bool(raw.get("attention_bias", False))
        # transformers' defaults where config.json leaves a key out: Qwen's dataclass fields
        # (32 KV heads, Qwen3's head_dim 128), Llama's derived ones; an explicit null derives.
        kv_heads = raw.get("num_key_value_heads", None if model_type == "llama" else 32) or heads
        head_dim = raw.get("head_dim", 128 if model_type == "qwen3" else None) or raw["hidden_size"] // heads
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope(raw).get("rope_theta", raw.get("rope_theta", 10000.0))),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            pad_token_id=raw.get("pad_token_id"),
            raw=dict(raw),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` this was read from (what ``export_hf_directory`` writes back)."""
        return dict(self.raw)


def _rope(raw: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers 5 writes ``rope_parameters``, older files ``rope_scaling``;
    like transformers, a ``rope_scaling`` wins."""
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def unsupported_reason(raw: dict[str, Any]) -> str | None:
    """Why a ``config.json`` is beyond this decoder, or None when it runs it exactly."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {list(MODEL_TYPES)}"
    rope = _rope(raw)
    if any(isinstance(value, dict) for value in rope.values()):
        return "RoPE parameters per layer type"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f"RoPE type {rope_type!r} (only the default, unscaled RoPE is implemented)"
    if raw.get("attention_dropout") not in (None, 0, 0.0):
        return f"attention_dropout={raw['attention_dropout']} (the decoder applies no dropout)"
    if raw.get("quantization_config"):
        return "a quantized checkpoint (quantization_config)"
    if raw.get("hidden_act", "silu") != "silu":
        return f"hidden_act {raw['hidden_act']!r} (only silu is implemented)"
    if raw.get("use_sliding_window") or any(t != "full_attention" for t in raw.get("layer_types") or ()):
        return "sliding-window attention layers"
    if raw.get("pretraining_tp", 1) != 1:
        return f"pretraining_tp={raw['pretraining_tp']}"
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(raw.get(k), int)]
    if missing:
        return f"config.json lacks integer {missing}"
    return None


class Linear(nn.Linear):
    """``nn.Linear`` without a random init: every weight comes from a checkpoint. (Initialising
    on the meta device would import torch's reference decompositions: 2 s of CPU.)"""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, the statistics in fp32 whatever the input's dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin ``[B, T, head_dim]`` of the default RoPE at ``positions [B, T]``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, T, hd]`` rotated by ``cos, sin [B, T, hd]``."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def project_qkv(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, heads, T, hd]`` of ``x [B, T, H]``, RoPE applied (after Qwen3's per-head
    norms). ``attn`` is this module's ``Attention`` or transformers' (the native engine
    drives either): the same projections under the same names."""
    batch, width, _ = x.shape
    q = attn.q_proj(x).view(batch, width, -1, head_dim)
    k = attn.k_proj(x).view(batch, width, -1, head_dim)
    v = attn.v_proj(x).view(batch, width, -1, head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        hidden, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.scaling = hd ** -0.5
        self.q_proj = Linear(hidden, config.num_attention_heads * hd, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.o_proj = Linear(config.num_attention_heads * hd, hidden, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: an RMSNorm over each head's vector before RoPE
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, width, _ = x.shape
        q, k, v = project_qkv(self, x, cos, sin, self.head_dim)
        grouped = k.shape[1] != q.shape[1]
        if grouped and mask is not None and q.device.type != "cpu":
            # SDPA's CUDA kernels take grouped heads only without a mask (else the math
            # kernel, [T, T] per head): repeat K/V to the query heads instead, as transformers does
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            grouped = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and width > 1,
                                             scale=self.scaling, enable_gqa=grouped)
        return self.o_proj(out.transpose(1, 2).reshape(batch, width, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def attention_mask_4d(attention_mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Causal and key-padding mask ``[B, 1, T, T]`` (True = attend) from a ``[B, T]`` padding
    mask; None when nothing is padded (SDPA's causal kernel then needs no mask).

    Every position also attends to itself, so a padding query never has an empty row (whose
    softmax would be NaN); padding outputs are never scored.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keys = torch.arange(width, device=attention_mask.device)
    causal = keys[None, :] <= keys[:, None]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(width, dtype=torch.bool, device=attention_mask.device)


class DecoderModel(nn.Module):
    """The decoder stack: embeddings, layers, final norm (transformers' ``XModel``)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,  # no init
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> SimpleNamespace:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, width = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(width, device=hidden.device).expand(batch, width)
        cos, sin = self.rotary_emb(hidden, position_ids)
        mask = attention_mask_4d(attention_mask, width)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, cos, sin, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask)
        return SimpleNamespace(last_hidden_state=self.norm(hidden))


class DecoderForCausalLM(nn.Module):
    """Decoder plus output head, with the parts of transformers' model API Forge uses."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> SimpleNamespace:
        """``.logits [B, T, V]``; the arguments after the first two by keyword, as transformers'
        other positional arguments (the KV cache) mean nothing here."""
        hidden = self.model(input_ids, attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))

    def get_decoder(self) -> DecoderModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each layer's activations in backward (non-reentrant checkpointing)."""
        if gradient_checkpointing_kwargs and gradient_checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError("Forge's decoder checkpoints non-reentrantly only (use_reentrant=False)")
        self.model.gradient_checkpointing = True


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())


def weight_files(directory: Path) -> list[Path] | None:
    """The safetensors files of a model directory, or None when it has none."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    return [single] if single.exists() else None


def load_decoder(directory: Path, dtype: torch.dtype, device: str | torch.device = "cpu",
                 raw: dict[str, Any] | None = None) -> DecoderForCausalLM:
    """The model in ``directory`` (config.json + safetensors), in eval mode on ``device``;
    ``raw`` is its ``config.json`` when the caller has read it already.

    Built without a random init (``Linear``, an empty embedding) and given the file's
    tensors (each cast to ``dtype`` as it is read) as its parameters: no init work and no
    second copy of the weights. (No meta device: its first use imports torch's decompositions, 2 s of CPU.)
    """
    from safetensors import safe_open

    directory = Path(directory)
    raw = read_config(directory) if raw is None else raw
    config = DecoderConfig.from_dict(raw)
    files = weight_files(directory)
    if files is None:
        raise ValueError(f"{directory} has no model.safetensors (or index); Forge's decoder reads safetensors only")
    state: dict[str, torch.Tensor] = {}
    for file in files:  # tensor by tensor, each cast as it arrives: no whole second copy in another dtype
        with safe_open(str(file), framework="pt", device=str(device)) as weights:
            for name in weights.keys():
                if not name.endswith("rotary_emb.inv_freq"):  # written by old transformers; recomputed here
                    state[name] = weights.get_tensor(name).to(dtype)
    model = DecoderForCausalLM(config)  # uninitialised memory, replaced below
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights in {directory} do not fit its config.json: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.to(device)
    generation = directory / "generation_config.json"  # else, like transformers, config.json's
    source = json.loads(generation.read_text()) if generation.exists() else raw
    model.generation_config.eos_token_id = source.get("eos_token_id")
    return model.eval()

"""The native engine's device work: batched prefill and decode over a slot KV cache.

The model is a ``transformers`` causal LM of the Llama family layout (Llama, Qwen2,
Qwen3: ``model.embed_tokens``, ``model.layers[i].self_attn.{q,k,v,o}_proj`` with
optional ``q_norm``/``k_norm``, ``mlp``, two RMSNorms, ``model.norm``, ``lm_head``,
``model.rotary_emb``). Its modules and weights are used as they are; only attention is
driven here, against a preallocated cache ``[layers][slots, kv_heads, max_len, head_dim]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, hd]; cos, sin: [B, T, hd]
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _decode_attention(
    q: torch.Tensor,  # [B, heads, 1, hd]
    keys: torch.Tensor,  # [B, kv_heads, S, hd]
    values: torch.Tensor,  # [B, kv_heads, S, hd]
    mask: torch.Tensor,  # [B, 1, 1, S] bool
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its cache; grouped heads without repeating K/V.

    Two batched matmuls beat SDPA's CPU kernel for a single query row per sequence.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # [B, kvh, g, hd]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale  # [B, kvh, g, S]
    scores = scores.float().masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(batch, heads, 1, head_dim)


def check_supported(model: Any) -> None:
    """Raise ValueError when the model does not have the layout the native engine drives."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    if (
        inner is None or layers is None or attn is None or not all(hasattr(attn, n) for n in needed)
        or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head")
    ):
        raise ValueError(
            f"the native engine drives Llama-family decoder layouts (Llama, Qwen2, Qwen3); "
            f"{type(model).__name__} is not one. Use engine_config backend='vllm' for it."
        )


class ModelRunner:
    """Owns the model and its KV cache; turns token batches into next-token logits."""

    def __init__(self, model: Any, num_slots: int, max_model_len: int) -> None:
        check_supported(model)
        self.model = model
        config = model.config
        self.layers = model.model.layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        shape = (num_slots, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write the prompts' K/V into ``slots``; logits ``[P, V]`` (fp32) after each prompt."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        keys = torch.arange(width, device=self.device)
        causal = keys[None, :] <= keys[:, None]  # [T, T]
        mask = causal[None, None] & (keys[None, None, None, :] < lengths[:, None, None, None])
        slot_index = torch.tensor(slots, device=self.device)
        hidden = self._forward(ids, positions, mask, slot_index, prefill_width=width)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self.model.lm_head(last).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int], kv_len: int) -> torch.Tensor:
        """Feed one token per sequence at ``positions``; logits ``[B, V]`` (fp32)."""
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        keys = torch.arange(kv_len, device=self.device)
        mask = (keys[None, :] <= pos)[:, None, None, :]  # [B, 1, 1, S]
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            slot_index: Any = slice(first, first + len(slots))  # a view of the cache, no gather copy
        else:
            slot_index = torch.tensor(slots, device=self.device)
        hidden = self._forward(ids, pos, mask, slot_index, kv_len=kv_len)
        return self.model.lm_head(hidden[:, 0]).float()

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Share a prefilled prompt with the other samples of a request (n > 1)."""
        index = torch.tensor(targets, device=self.device)
        for cache in (*self.k_cache, *self.v_cache):
            cache[index, :, :length] = cache[source, :, :length]

    def _forward(
        self,
        ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        mask: torch.Tensor,  # [B, 1, T, S] bool, True = attend
        slots: torch.Tensor | slice,  # [B] cache slots, or a contiguous range of them
        prefill_width: int | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        inner = self.model.model
        batch, width = ids.shape
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, width, -1, self.head_dim)
            k = attn.k_proj(x).view(batch, width, -1, self.head_dim)
            v = attn.v_proj(x).view(batch, width, -1, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if prefill_width is not None:
                self.k_cache[i][slots, :, :prefill_width] = k
                self.v_cache[i][slots, :, :prefill_width] = v
                keys, values = k, v
            else:
                rows = self.k_cache[i][slots], self.v_cache[i][slots]  # views when slots is a slice
                if isinstance(slots, slice):
                    index = torch.arange(batch, device=self.device)
                    rows[0][index, :, positions[:, 0]] = k[:, :, 0]
                    rows[1][index, :, positions[:, 0]] = v[:, :, 0]
                    keys, values = rows[0][:, :, :kv_len], rows[1][:, :, :kv_len]
                else:
                    self.k_cache[i][slots, :, positions[:, 0]] = k[:, :, 0]
                    self.v_cache[i][slots, :, positions[:, 0]] = v[:, :, 0]
                    keys = self.k_cache[i][slots, :, :kv_len]
                    values = self.v_cache[i][slots, :, :kv_len]
            if prefill_width is not None:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1]
                )
            else:
                out = _decode_attention(q, keys, values, mask, attn.scaling)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return inner.norm(hidden)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy new weights in place (Hugging Face parameter names)."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

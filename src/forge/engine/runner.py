"""The native engine's device work: batched prefill and decode over a slot KV cache.

The model is a causal LM of the Llama family layout (Llama, Qwen2, Qwen3; Forge's
``forge.models.decoder`` or transformers' classes, which share it: ``model.embed_tokens``,
``model.layers[i].self_attn.{q,k,v,o}_proj`` with optional ``q_norm``/``k_norm``, ``mlp``,
two RMSNorms, ``model.norm``, ``lm_head``, ``model.rotary_emb``). Its modules and weights are used as they are; only attention is
driven here, against a preallocated cache ``[layers][slots, kv_heads, max_len, head_dim]``.

The prefix cache's K/V live here too, in a block pool ``[layers][blocks, block_size,
kv_heads, head_dim]`` (which prefix each block holds is ``prefix_cache.py``'s
bookkeeping). It is one tensor per layer, so a request's cached blocks reach its slot in
one indexed copy per layer, and it is grown by doubling as block ids are first used, up
to the budget: memory follows what is cached, and an unused budget costs nothing. A
growth copies the pool once (amortised: each block is copied O(1) times).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from forge.engine.prefix_cache import BLOCK_SIZE
from forge.models.decoder import project_qkv


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

    def __init__(self, model: Any, num_slots: int, max_model_len: int, max_cached_blocks: int = 0,
                 block_size: int = BLOCK_SIZE) -> None:
        check_supported(model)
        self.model = model
        config = model.config
        self.layers = model.model.layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_model_len = max_model_len
        shape = (num_slots, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.block_size = block_size
        self.max_cached_blocks = max_cached_blocks
        self.k_blocks: list[torch.Tensor] = []  # the prefix cache's pool, allocated on first use
        self.v_blocks: list[torch.Tensor] = []

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], starts: list[int] | None = None) -> torch.Tensor:
        """Write the prompts' K/V into ``slots``; logits ``[P, V]`` (fp32) after each prompt.

        ``starts[i]`` tokens of prompt ``i`` already have their K/V in its slot (copied from
        the prefix cache): only positions ``[starts[i], len)`` are computed, attending over
        the slot's ``[0, len)``. Rows may mix 0 and other starts.
        """
        if not starts or not any(starts):
            return self._prefill_from_zero(prompts, slots)
        lengths = [len(p) for p in prompts]
        width = max(n - s for n, s in zip(lengths, starts))  # new tokens of the longest row
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, (prompt, start) in enumerate(zip(prompts, starts)):
            ids[row, : len(prompt) - start] = torch.tensor(prompt[start:], device=self.device)
        offsets = torch.arange(width, device=self.device)
        # A padding column's position runs past its prompt: clamped into the cache, its K/V
        # land at or after the prompt's end, where decode writes each position before reading it.
        positions = (torch.tensor(starts, device=self.device)[:, None] + offsets).clamp(max=self.max_model_len - 1)
        kv_len = max(lengths)
        keys = torch.arange(kv_len, device=self.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S]: no row fully masked
        hidden = self._forward(ids, positions, mask, self._slot_index(slots), kv_len=kv_len)
        last = torch.tensor([n - s - 1 for n, s in zip(lengths, starts)], device=self.device)
        return self.model.lm_head(hidden[torch.arange(len(prompts), device=self.device), last]).float()

    def _prefill_from_zero(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """No cached prefix: attention reads the new K/V directly, not the cache (no gather)."""
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
        hidden = self._forward(ids, positions, mask, slot_index)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self.model.lm_head(last).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int], kv_len: int) -> torch.Tensor:
        """Feed one token per sequence at ``positions``; logits ``[B, V]`` (fp32)."""
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        keys = torch.arange(kv_len, device=self.device)
        mask = (keys[None, :] <= pos)[:, None, None, :]  # [B, 1, 1, S]
        hidden = self._forward(ids, pos, mask, self._slot_index(slots), kv_len=kv_len)
        return self.model.lm_head(hidden[:, 0]).float()

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Share a prefilled prompt with the other samples of a request (n > 1)."""
        index = torch.tensor(targets, device=self.device)
        for cache in (*self.k_cache, *self.v_cache):
            cache[index, :, :length] = cache[source, :, :length]

    @torch.inference_mode()
    def save_blocks(self, slots: list[int], starts: list[int], block_ids: list[int]) -> None:
        """Copy ``block_size`` positions from ``starts[i]`` of slot ``slots[i]`` into pool
        block ``block_ids[i]`` (ids distinct), for every ``i`` in one indexed copy per layer."""
        needed = max(block_ids) + 1
        if needed > self.num_pool_blocks:
            self._grow_pool(needed)
        slot_index, positions, block_index = self._block_indices(slots, starts, block_ids)
        for cache, pool in zip((*self.k_cache, *self.v_cache), (*self.k_blocks, *self.v_blocks)):
            pool[block_index] = cache[slot_index, :, positions]  # [M, block_size, kv_heads, hd]

    @torch.inference_mode()
    def load_blocks(self, slots: list[int], starts: list[int], block_ids: list[int]) -> None:
        """The reverse of ``save_blocks``: cached blocks into slots, one indexed copy per layer."""
        slot_index, positions, block_index = self._block_indices(slots, starts, block_ids)
        for cache, pool in zip((*self.k_cache, *self.v_cache), (*self.k_blocks, *self.v_blocks)):
            cache[slot_index, :, positions] = pool[block_index]

    def _block_indices(
        self, slots: list[int], starts: list[int], block_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slot_index = torch.tensor(slots, device=self.device)[:, None]  # [M, 1]
        offsets = torch.arange(self.block_size, device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + offsets  # [M, block_size]
        return slot_index, positions, torch.tensor(block_ids, device=self.device)

    @property
    def num_pool_blocks(self) -> int:
        """Blocks the prefix cache's pool has room for now."""
        return self.k_blocks[0].shape[0] if self.k_blocks else 0

    def _grow_pool(self, needed: int) -> None:
        """At least ``needed`` blocks; everything is allocated before anything changes, so
        a failed allocation leaves the pool as it was."""
        current = self.num_pool_blocks
        size = min(self.max_cached_blocks, max(needed, 2 * current, 16))
        assert needed <= size, f"block id {needed - 1} is past the prefix cache budget of {self.max_cached_blocks}"
        shape = (size, self.block_size, self.num_kv_heads, self.head_dim)
        grown_k = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        grown_v = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        for new, old in zip(grown_k + grown_v, self.k_blocks + self.v_blocks):
            new[:current] = old
        self.k_blocks, self.v_blocks = grown_k, grown_v

    def _write_and_read(
        self, layer: int, slots: torch.Tensor | slice, rows: torch.Tensor, positions: torch.Tensor,
        k: torch.Tensor, v: torch.Tensor, kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` ``[B, kv_heads, T, hd]`` at ``positions`` of their slots; return
        each slot's cache ``[B, kv_heads, kv_len, hd]``."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if isinstance(slots, slice):  # views: written through, read without a gather copy
            k_cache, v_cache, slots = k_cache[slots], v_cache[slots], slice(None)
        k_cache[rows, :, positions] = k.transpose(1, 2)  # indexed as [B, T, kv_heads, hd]
        v_cache[rows, :, positions] = v.transpose(1, 2)
        return k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len]

    def _slot_index(self, slots: list[int]) -> torch.Tensor | slice:
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return slice(first, first + len(slots))  # a view of the cache, no gather copy
        return torch.tensor(slots, device=self.device)

    def _forward(
        self,
        ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        mask: torch.Tensor,  # [B, 1, T, S] bool, True = attend
        slots: torch.Tensor | slice,  # [B] cache slots, or a contiguous range of them
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """The decoder over ``ids``, their K/V written to the slots at ``positions``.

        ``kv_len=None``: every row starts at position 0, so attention reads the new K/V
        directly. Otherwise attention reads each slot's cache ``[0, kv_len)``: earlier
        tokens (decode, or a prefill after a cached prefix) come from there.
        """
        inner = self.model.model
        batch, width = ids.shape
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        rows = torch.arange(batch, device=self.device)[:, None] if isinstance(slots, slice) else slots[:, None]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = project_qkv(attn, x, cos, sin, self.head_dim)
            if kv_len is None:
                self.k_cache[i][slots, :, :width] = k
                self.v_cache[i][slots, :, :width] = v
                keys, values = k, v
            else:
                keys, values = self._write_and_read(i, slots, rows, positions, k, v, kv_len)
            if kv_len is not None and width == 1:
                out = _decode_attention(q, keys, values, mask, attn.scaling)
            else:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1]
                )
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

"""``ReferenceModel``: a frozen copy of the initial policy that scores responses.

    ref = await ReferenceModel.options(procs=1).as_actor(model={"name": "qwen3", "flavor": "tiny"})
    logprobs = await ref.forward.call_one(input_ids, max_req_tokens=P, return_logprobs=True)

``input_ids`` is ``[B, L]``: the first ``max_req_tokens`` positions hold the request
(prompt) and the rest the response, as in ``torch.cat([prompt_ids, token_ids])`` when
every prompt is ``max_req_tokens`` long (left-pad shorter prompts). The result is
``[B, L - max_req_tokens]``: the fp32 logprob of each response token.

Logprobs are computed in chunks of ``chunk_size`` positions: the decoder runs once, then
``lm_head`` + log-softmax run chunk by chunk, so the full ``[B, L, V]`` fp32 logits are
never held at once (peak extra memory O(B * chunk_size * V); bench/reference_memory.py).
"""

from __future__ import annotations

import torch
from monarch.actor import endpoint

from forge.actors._model_spec import ModelSpec
from forge.controller import ForgeActor


def chunked_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, L]
    start: int,  # first scored position (the first response token)
    chunk_size: int = 128,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``out[b, j] = log p(input_ids[b, start + j] | input_ids[b, < start + j])``; [B, L - start] fp32."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # [B, L, H]
    targets = input_ids[:, start:]  # [B, T]
    out = torch.empty(targets.shape, dtype=torch.float32, device=input_ids.device)
    for begin in range(0, targets.shape[1], chunk_size):
        end = min(begin + chunk_size, targets.shape[1])
        logits = model.lm_head(hidden[:, start + begin - 1 : start + end - 1]).float() / temperature  # [B, c, V]
        logp = torch.log_softmax(logits, dim=-1)
        out[:, begin:end] = logp.gather(2, targets[:, begin:end, None])[..., 0]
        del logits, logp
    return out


class ReferenceModel(ForgeActor):
    """See the module docstring."""

    def __init__(self, model: dict | ModelSpec | None = None, chunk_size: int = 128, temperature: float = 1.0) -> None:
        self.model_spec = ModelSpec.parse(model)
        self.chunk_size = chunk_size
        self.temperature = temperature

    @classmethod
    def validate_arguments(cls, model=None, chunk_size: int = 128, temperature: float = 1.0, **unknown) -> None:
        if unknown:
            raise ValueError(f"ReferenceModel got unknown argument(s) {sorted(unknown)}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ReferenceModel chunk_size must be an int >= 1, got {chunk_size!r}")
        if temperature <= 0:
            raise ValueError(f"ReferenceModel temperature must be > 0, got {temperature!r}")
        ModelSpec.parse(model).path()

    @endpoint
    async def setup(self) -> None:
        from forge.models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(self.model_spec.path(), self.model_spec.dtype, device)
        self.model.requires_grad_(False)

    @endpoint
    async def forward(self, input_ids: torch.Tensor, max_req_tokens: int, return_logprobs: bool = True) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        if ids.dim() == 1:
            ids = ids[None]
        if not 0 < max_req_tokens < ids.shape[1]:
            raise ValueError(
                f"max_req_tokens={max_req_tokens} must be the request length, inside the "
                f"{ids.shape[1]}-token input (request first, then response)"
            )
        with torch.inference_mode():
            if return_logprobs:
                return chunked_logprobs(self.model, ids, max_req_tokens, self.chunk_size, self.temperature).cpu()
            return self.model(input_ids=ids).logits[:, max_req_tokens - 1 : -1].float().cpu()

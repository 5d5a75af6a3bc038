"""``ReferenceModel``: a frozen copy of the initial policy that scores responses.

    ref = await ReferenceModel.options(procs=1).as_actor(model={"name": "qwen3", "flavor": "tiny"})
    logprobs = await ref.forward.call_one(input_ids, max_req_tokens=P, return_logprobs=True)

``input_ids`` is ``[B, L]``: the first ``max_req_tokens`` positions hold the request
(prompt) and the rest the response, as in ``torch.cat([prompt_ids, token_ids])`` when
every prompt is ``max_req_tokens`` long (left-pad shorter prompts). The result is
``[B, L - max_req_tokens]``: the fp32 logprob of each response token.

Logprobs are computed by the trainer's chunked code (``forge.losses.logprobs``): the
decoder runs once, then the head and log-softmax run over blocks of at most
``chunk_elements`` logits (0: auto), so the full ``[B, L, V]`` fp32 logits are never held
at once (bench/reference_memory.py). The model is loaded in ``model.dtype``
(bf16 halves its memory; logprobs are fp32 either way).

A ``max_req_tokens`` that is not a split point inside the input (e.g. 512 with an unpadded
40-token input) raises ``ValueError`` in the caller, before the message is sent.
"""

from __future__ import annotations

import torch
from monarch.actor import endpoint

from forge.actors._model_spec import ModelSpec
from forge.controller import ForgeActor, checked_in_caller
from forge.losses import response_logprobs


def check_forward(input_ids: torch.Tensor, max_req_tokens: int, return_logprobs: bool = True) -> None:
    """``forward``'s arguments: a 1-D or 2-D token tensor, and a split point inside it."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"ReferenceModel.forward: input_ids must be a [B, L] (or [L]) token tensor, got {shape}")
    length = input_ids.shape[-1]
    if isinstance(max_req_tokens, bool) or not isinstance(max_req_tokens, int) or not 0 < max_req_tokens < length:
        raise ValueError(
            f"ReferenceModel.forward: max_req_tokens={max_req_tokens!r} must be the request length, a split point "
            f"inside the {length}-token input (request first, then response): 1..{length - 1}. With unpadded "
            "prompts pass len(prompt_ids); with prompts left-padded to P tokens pass P"
        )


class ReferenceModel(ForgeActor):
    """See the module docstring."""

    def __init__(self, model: dict | ModelSpec | None = None, chunk_elements: int = 0,
                 temperature: float = 1.0) -> None:
        self.model_spec = ModelSpec.parse(model)
        self.chunk_elements = chunk_elements
        self.temperature = temperature

    @classmethod
    def validate_arguments(cls, model=None, chunk_elements: int = 0, temperature: float = 1.0, **unknown) -> None:
        if unknown:
            raise ValueError(f"ReferenceModel got unknown argument(s) {sorted(unknown)}")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 0:
            raise ValueError(f"ReferenceModel chunk_elements must be an int >= 0 (0: auto), got {chunk_elements!r}")
        if temperature <= 0:
            raise ValueError(f"ReferenceModel temperature must be > 0, got {temperature!r}")
        ModelSpec.parse(model).path()

    @endpoint
    async def setup(self) -> None:
        from forge.models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # inference only: the weights in model.dtype, no fp32 master
        self.model = load_model(self.model_spec.path(), self.model_spec.dtype, device, self.model_spec.impl)
        self.model.requires_grad_(False)

    @endpoint
    @checked_in_caller(check_forward)
    async def forward(self, input_ids: torch.Tensor, max_req_tokens: int, return_logprobs: bool = True) -> torch.Tensor:
        check_forward(input_ids, max_req_tokens, return_logprobs)
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        if ids.dim() == 1:
            ids = ids[None]
        with torch.inference_mode():
            if return_logprobs:
                return response_logprobs(self.model, ids, max_req_tokens, self.chunk_elements, self.temperature).cpu()
            return self.model(input_ids=ids).logits[:, max_req_tokens - 1 : -1].float().cpu()

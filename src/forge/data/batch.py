"""What the replay buffer hands the trainer: typed, padded tensors.

Layout: each row is one episode, ``tokens = prompt + response`` right-padded to the
batch's longest row. Per-token arrays are aligned with ``tokens``: position ``t`` holds
the value for ``tokens[t]`` (its logprob given ``tokens[<t]``). ``response_mask`` is 1
exactly on the response tokens the policy generated, so prompt, padding and the tokens
an environment inserted into a multi-turn response (``loss_masks``) never contribute to
the loss.

An episode given without behaviour logprobs (an empty list) has
``has_behaviour[i] = False`` and zeros in its row: the trainer treats it as on-policy,
using its own detached logprobs there (ratio 1). One without reference logprobs (None,
when the loss has no KL term) has ``has_reference[i] = False``; the trainer accepts such
rows only with ``beta = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainInputs:
    tokens: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 on real tokens

    def select(self, rows: slice) -> "TrainInputs":
        return TrainInputs(self.tokens[rows], self.attention_mask[rows])


@dataclass
class TrainTargets:
    response_mask: torch.Tensor  # [B, L] float, 1 on the policy's response tokens
    advantages: torch.Tensor  # [B] float
    behaviour_logprobs: torch.Tensor  # [B, L] float, generator's logprobs (0 off the response)
    ref_logprobs: torch.Tensor  # [B, L] float, reference model's logprobs (0 off the response)
    has_behaviour: torch.Tensor | None = None  # [B] bool, False where none were given; None: all given
    has_reference: torch.Tensor | None = None  # [B] bool, False where none were given; None: all given

    def select(self, rows: slice) -> "TrainTargets":
        def part(flags: torch.Tensor | None) -> torch.Tensor | None:
            return None if flags is None else flags[rows]

        return TrainTargets(self.response_mask[rows], self.advantages[rows], self.behaviour_logprobs[rows],
                            self.ref_logprobs[rows], part(self.has_behaviour), part(self.has_reference))

    def _missing(self, flags: torch.Tensor | None) -> torch.Tensor:
        if flags is None:
            return torch.zeros(self.advantages.shape[0], dtype=torch.bool)
        return ~flags

    def missing_behaviour(self) -> torch.Tensor:
        """[B] bool: rows to be trained as on-policy (no behaviour logprobs were given)."""
        return self._missing(self.has_behaviour)

    def missing_reference(self) -> torch.Tensor:
        """[B] bool: rows without reference logprobs (trainable only without a KL term)."""
        return self._missing(self.has_reference)


def collate(
    prompts: list[list[int]],
    responses: list[list[int]],
    behaviour_logprobs: list[list[float]],  # an empty one: none given (trained as on-policy)
    ref_logprobs: list[list[float] | None],  # None: no reference (a loss without KL term)
    advantages: list[float],
    pad_id: int,
    loss_masks: list[list[int] | None] | None = None,  # per response token: 1 policy, 0 environment; None: all 1
) -> tuple[TrainInputs, TrainTargets]:
    """Pad episodes into one batch (see the module docstring for the layout)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    has_behaviour = [len(b) > 0 for b in behaviour_logprobs]
    has_reference = [r is not None for r in ref_logprobs]
    # Rows are built as Python lists and become tensors once: a few slice assignments per row
    # cost more than the whole batch's lists (this runs in the replay buffer for every step).
    token_rows, attention_rows, mask_rows, behaviour_rows, ref_rows = [], [], [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = _values(prompt), _values(response)
        start, end = len(prompt), len(prompt) + len(response)
        before, after = [0.0] * start, [0.0] * (width - end)
        token_rows.append(prompt + response + [pad_id] * (width - end))
        attention_rows.append([1] * end + [0] * (width - end))
        given = loss_masks[i] if loss_masks is not None else None
        mask_rows.append(before + ([1.0] * len(response) if given is None else _row(given, response, "loss mask", i))
                         + after)
        behaviour_rows.append(before + (_row(behaviour_logprobs[i], response, "behaviour logprobs", i)
                                        if has_behaviour[i] else [0.0] * len(response)) + after)
        ref_rows.append(before + (_row(ref_logprobs[i], response, "reference logprobs", i)
                                  if has_reference[i] else [0.0] * len(response)) + after)
    tokens = torch.tensor(token_rows, dtype=torch.long)
    attention = torch.tensor(attention_rows, dtype=torch.long)
    mask, behaviour, ref = (torch.tensor(rows, dtype=torch.float32) for rows in (mask_rows, behaviour_rows, ref_rows))
    has_behaviour = torch.tensor(has_behaviour, dtype=torch.bool)
    has_reference = torch.tensor(has_reference, dtype=torch.bool)
    return (TrainInputs(tokens, attention),
            TrainTargets(mask, torch.tensor(advantages, dtype=torch.float32), behaviour, ref,
                         None if bool(has_behaviour.all()) else has_behaviour,
                         None if bool(has_reference.all()) else has_reference))


def _values(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _row(values: Any, response: list, what: str, row: int) -> list[float]:
    """A per-response-token list of floats, checked to be as long as the response."""
    values = [float(v) for v in _values(values)]
    if len(values) != len(response):
        raise ValueError(f"collate: row {row} has {len(response)} response tokens but {len(values)} {what}; "
                         "give one value per response token")
    return values

"""Completions cross processes column by column and arrive as the same values."""

import pickle
from dataclasses import dataclass

import cloudpickle
import torch

from forge.actors.policy import Completion, CompletionList


def completion(prompt_ids: torch.Tensor, tokens: list[int], version: int = 3, index: int = 0) -> Completion:
    return Completion("3+4=", f"text {index}", prompt_ids, torch.tensor(tokens, dtype=torch.long),
                      torch.tensor([-0.5] * len(tokens)),
                      "stop", version, {"index": index})


def as_tuple(c: Completion) -> tuple:
    return (c.prompt, c.text, c.prompt_ids.tolist(), c.prompt_ids.dtype, c.token_ids.tolist(), c.token_ids.dtype,
            c.logprobs.tolist(), c.logprobs.dtype, c.stop_reason, c.generator_version, c.metadata)


def test_a_batch_of_groups_arrives_with_the_same_values_and_shape():
    groups = CompletionList()
    for g in range(3):
        prompt = torch.tensor([1, 2, 3 + g])
        groups.append(CompletionList(completion(prompt, list(range(i + g)), version=g, index=i) for i in range(4)))
    back = pickle.loads(cloudpickle.dumps(groups))
    assert isinstance(back, CompletionList) and [len(g) for g in back] == [4, 4, 4]
    assert [[as_tuple(c) for c in g] for g in back] == [[as_tuple(c) for c in g] for g in groups]
    assert back[0][0].token_ids.tolist() == [] and back[0][0].logprobs.dtype == torch.float32  # empty responses too
    assert back[2][0].prompt_ids is back[2][3].prompt_ids  # a group's prompt travels once


def test_a_flat_list_and_an_empty_one_round_trip():
    flat = CompletionList(completion(torch.tensor([7, 8]), [5, 6, 2], index=i) for i in range(2))
    back = pickle.loads(cloudpickle.dumps(flat))
    assert isinstance(back, CompletionList) and [as_tuple(c) for c in back] == [as_tuple(c) for c in flat]
    assert pickle.loads(cloudpickle.dumps(CompletionList())) == []


@dataclass
class Rollout(Completion):  # e.g. a subclass with more fields: not packed, but not lost either
    turns: int = 1


def test_other_items_travel_as_a_plain_list_with_nothing_lost():
    item = Rollout("p", "t", torch.tensor([1]), torch.tensor([2]), torch.tensor([-0.1]), "stop", 0, {}, turns=2)
    back = pickle.loads(cloudpickle.dumps(CompletionList([item])))
    assert type(back) is list and back[0].turns == 2 and back[0].token_ids.tolist() == [2]
    mixed = pickle.loads(cloudpickle.dumps(CompletionList([completion(torch.tensor([1]), [2]), "not a completion"])))
    assert mixed[1] == "not a completion" and mixed[0].token_ids.tolist() == [2]


def test_tensors_of_other_dtypes_shapes_and_with_grad_keep_them():
    odd = Completion("p", "t", torch.tensor([1, 2], dtype=torch.int32), torch.tensor(5),
                     torch.tensor([-0.25], dtype=torch.float64, requires_grad=True), "length", 1, {})
    plain = completion(torch.tensor([1, 2]), [3])
    back = pickle.loads(cloudpickle.dumps(CompletionList([odd, plain])))
    assert back[0].prompt_ids.dtype == torch.int32 and back[1].prompt_ids.dtype == torch.int64
    assert back[0].token_ids.tolist() == [5] and back[0].logprobs.tolist() == [-0.25]
    assert back[0].logprobs.dtype == torch.float64 and not back[0].logprobs.requires_grad
    bf16 = [completion(torch.tensor([1]), [2, 3]) for _ in range(2)]
    for c in bf16:
        c.logprobs = c.logprobs.to(torch.bfloat16)  # numpy has no bfloat16: still travels
    back = pickle.loads(cloudpickle.dumps(CompletionList(bf16)))
    assert back[1].logprobs.dtype == torch.bfloat16 and back[1].logprobs.tolist() == [-0.5, -0.5]
    one = pickle.loads(cloudpickle.dumps(bf16[0]))
    assert one.logprobs.dtype == torch.bfloat16 and one.token_ids.tolist() == [2, 3]

"""Chunked reference logprobs and batch collation, in-process."""

import pytest
import torch

from forge.data.batch import collate
from forge.losses import response_logprobs, sequence_logprobs
from forge.models import load_model


def test_chunked_logprobs_equal_a_full_forward_for_any_chunk_size():
    model = load_model("tiny")
    torch.manual_seed(0)
    ids = torch.randint(4, 20, (3, 17))
    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits.float(), -1)
        expected = full[:, 4:-1].gather(2, ids[:, 5:, None])[..., 0]
        for chunk in (1, 3, 128):
            assert torch.allclose(response_logprobs(model, ids, 5, chunk), expected, atol=1e-5)


def test_collate_aligns_logprobs_and_mask_with_response_tokens():
    inputs, targets = collate([[1, 2], [3]], [[4, 5, 6], [7]], [[-.1, -.2, -.3], [-.4]], [[-1., -2., -3.], [-4.]],
                              [0.5, -0.5], pad_id=0)
    assert inputs.tokens.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert inputs.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert targets.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert targets.behaviour_logprobs[0, 2:].tolist() == torch.tensor([-.1, -.2, -.3]).tolist()
    assert targets.ref_logprobs[1, 1].item() == -4.0
    # the loss's logprobs use the same alignment: position t scores tokens[t]
    logits = torch.randn(2, 5, 8)
    assert sequence_logprobs(logits, inputs.tokens).shape == inputs.tokens.shape


def test_collate_takes_tensors_and_names_a_row_whose_logprobs_do_not_fit_its_response():
    as_lists = collate([[1, 2]], [[4, 5]], [[-.1, -.2]], [None], [1.0], pad_id=0, loss_masks=[[1, 0]])
    as_tensors = collate([torch.tensor([1, 2])], [torch.tensor([4, 5])], [torch.tensor([-.1, -.2])], [None], [1.0],
                         pad_id=0, loss_masks=[torch.tensor([1, 0])])
    for a, b in zip(as_lists[0].__dict__.values(), as_tensors[0].__dict__.values()):
        assert torch.equal(a, b)
    assert torch.equal(as_lists[1].response_mask, as_tensors[1].response_mask)
    assert as_lists[1].response_mask.tolist() == [[0, 0, 1, 0]] and as_lists[1].has_reference.tolist() == [False]
    with pytest.raises(ValueError, match="row 1 has 1 response tokens but 2 behaviour logprobs"):
        collate([[1], [2]], [[3], [4]], [[-.1], [-.2, -.3]], [None, None], [0.0, 0.0], pad_id=0)

"""Continuous-batching bookkeeping, without torch."""

import pytest

from forge.engine.config import SamplingParams
from forge.engine.scheduler import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Scheduler

EOS = 2


def make(num_slots=4, max_len=32):
    return Scheduler(num_slots, max_len, (EOS,))


def test_requests_are_admitted_in_order_while_slots_last():
    s = make(num_slots=4)
    a = s.add([5, 6], SamplingParams(n=2))
    b = s.add([7], SamplingParams(n=2))
    c = s.add([8], SamplingParams(n=1))
    assert s.admit() == [a, b]
    assert len(s.running) == 4 and s.free_slots == []
    assert list(s.waiting) == [c]
    assert len({seq.slot for seq in s.running}) == 4


def test_a_finished_sample_frees_its_slot_for_the_next_request_at_once():
    s = make(num_slots=1)
    a = s.add([5], SamplingParams(max_tokens=2))
    b = s.add([6], SamplingParams(max_tokens=2))
    assert s.admit() == [a]
    s.append(a.sequences[0], 9, -0.1)
    assert s.admit() == []
    s.append(a.sequences[0], 9, -0.1)
    assert a.is_finished and a.sequences[0].finish_reason == FINISH_LENGTH
    assert s.admit() == [b]


def test_eos_and_stop_tokens_stop_unless_eos_is_ignored():
    s = make()
    a = s.add([5], SamplingParams(max_tokens=9))
    b = s.add([5], SamplingParams(max_tokens=9, stop_token_ids=(7,)))
    c = s.add([5], SamplingParams(max_tokens=9, ignore_eos=True))
    s.admit()
    s.append(a.sequences[0], EOS, 0.0)
    s.append(b.sequences[0], 7, 0.0)
    s.append(c.sequences[0], EOS, 0.0)
    assert a.sequences[0].finish_reason == FINISH_STOP
    assert b.sequences[0].finish_reason == FINISH_STOP
    assert not c.sequences[0].is_finished


def test_positions_follow_prompt_and_tokens():
    s = make()
    a = s.add([5, 6, 7], SamplingParams())
    s.admit()
    s.append(a.sequences[0], 9, 0.0)
    assert a.sequences[0].next_position == 3


def test_abort_frees_slots_and_unqueues():
    s = make(num_slots=2)
    a = s.add([5], SamplingParams(n=2))
    b = s.add([5], SamplingParams())
    s.admit()
    s.abort(a)
    s.abort(b)
    assert all(seq.finish_reason == FINISH_ABORT for seq in a.sequences)
    assert len(s.free_slots) == 2 and not s.waiting and not s.has_work


def test_no_admission_while_paused():
    s = make()
    s.add([5], SamplingParams())
    s.is_admitting = False
    assert s.admit() == [] and not s.has_work
    s.is_admitting = True
    assert len(s.admit()) == 1


def test_requests_that_cannot_fit_are_refused_with_the_limit_named():
    s = make(num_slots=2, max_len=8)
    with pytest.raises(ValueError, match="max_model_len=8"):
        s.add([1] * 8, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_num_seqs=2"):
        s.add([1], SamplingParams(n=3, max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        s.add([], SamplingParams(max_tokens=2))


def test_a_completion_that_would_overflow_max_model_len_ends_there_with_length():
    """As in vLLM: max_tokens beyond the room left is capped, not refused."""
    s = make(num_slots=1, max_len=8)
    a = s.add([1] * 5, SamplingParams(max_tokens=10))
    assert s.admit() == [a]
    for _ in range(3):
        s.append(a.sequences[0], 9, -0.1)
    assert a.is_finished and a.sequences[0].finish_reason == FINISH_LENGTH
    assert len(a.sequences[0].token_ids) == 3  # 5 + 3 fill the 8 positions

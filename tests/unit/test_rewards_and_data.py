"""Rewards, prompt sources, advantages and the replay buffer, without processes."""

import json

import pytest
import torch

from apps.grpo.actors import Episode, Group, group_advantages
from forge.actors.replay_buffer import EpisodeBuffer
from forge.data.datasets import ArithmeticTask, PromptSource, gsm8k_target, load_rows
from forge.data.rewards import MathReward, ThinkingReward, extract_answer


ANSWERS = [  # (text, the answer extracted from it)
    ("The answer is 42", 42), ("42", 42), ("no number", None), ("", None),
    ("-3", -3), ("2.5 apples", 2.5), (".5", 0.5), ("0.25", 0.25), ("3.", 3), ("answer: 3.", 3),
    ("1,234", 1234), ("$1,000,000.50", 1000000.5), ("1,2,3", 3), ("12,34", 34), ("(3,4)", 4),
    ("1e3", 1000), ("x = -2.5e-3", -0.0025), ("6.02E23", 6.02e23),
    ("\u22125", -5), ("it is \u22120.5", -0.5), ("10-3", 3), ("5-(-3)=8", 8), ("temperature -5 degrees", -5),
    ("x-4", 4), ("a)-4", 4), ("+7", 7),
    ("3/4", 0.75), ("-3/4", -0.75), ("1 / 8", 0.125), ("1/0", None),
    ("\\frac{3}{4}", 0.75), ("\\dfrac{1}{8}", 0.125), ("\\tfrac{-6}{3}", -2),
    ("\\boxed{7} and 8", 7), ("\\boxed{\\frac{1}{2}}", 0.5), ("\\boxed{-\\dfrac{3}{4}}", -0.75),
    ("so \\boxed{1,000} dollars, not 5", 1000), ("\\boxed{x} then 9", 9),
    ("<answer>17</answer> then 3", 17), ("<answer>I don't know</answer> step 17", None),
    ("<answer></answer> 5", None), ("<answer>1</answer><answer>2</answer>", 2), ("<answer> 3/4 </answer>", 0.75),
    ("so #### 1,234", 1234), ("#### 72\nthe end 5", 72), ("#### none 5", 5),
    ("15% of 240 is 36", 36), ("ratio 2:3 so 3", 3),
]


@pytest.mark.parametrize("text, expected", ANSWERS)
def test_answers_are_extracted_from_tags_hashes_boxed_or_the_last_number(text, expected):
    found = extract_answer(text)
    assert found == (pytest.approx(expected) if expected is not None else None), text


def test_there_are_at_least_forty_extraction_cases():
    assert len(ANSWERS) >= 40


def test_math_reward_compares_numerically_with_documented_partial_credit():
    reward = MathReward()
    assert reward("q", "it is 36", "36") == 1.0
    assert reward("q", "it is 36.0", "#### 36") == 1.0
    assert reward("q", "36 or 37", "36") == 0.0
    assert MathReward(partial_credit=0.25)("q", "36 or 37", "36") == 0.25
    assert reward("q", "anything", "not a number") == 0.0
    assert reward("q", "it is 0.75", "3/4") == 1.0  # a fraction target
    assert reward("q", "\\boxed{\\frac{3}{4}}", "0.75") == 1.0
    assert reward("q", "1234567.0000001", "1,234,567") == 1.0  # relative tolerance for large numbers
    assert reward("q", "<answer>unsure</answer> 36", "36") == 0.0


def test_thinking_reward_scores_a_think_block_before_the_answer():
    reward = ThinkingReward()
    assert reward("q", "<think>add them</think> 4", "4") == 1.0
    assert reward("q", "<think></think> 4", "4") == 0.5  # empty
    assert reward("q", "<think>unclosed 4", "4") == 0.5
    assert reward("q", "4 <think>x</think>", "4") == 0.5  # the answer came first
    assert reward("q", "<think>x</think>", "4") == 0.5  # no answer after it
    assert reward("q", "<think>a</think><think>b</think> 4", "4") == 0.5  # two blocks
    assert reward("q", "4", "4") == 0.0
    # a chat template that opens the block in the prompt: the response starts inside it
    assert reward("user: 2+2\nassistant: <think>", "add them</think> 4", "4") == 1.0
    assert reward("user: 2+2\nassistant: <think>", "</think> 4", "4") == 0.5


def test_the_embedded_task_has_single_digit_answers_and_a_random_policy_scores_low():
    rows = ArithmeticTask().rows()
    assert len(rows) == 55 and all(len(r["answer"]) == 1 for r in rows)
    # a uniformly random first token over the 21-token vocabulary is right ~1/21 of the time
    assert 1 / 21 <= 0.1


def test_prompt_source_shuffles_by_seed_runs_epochs_and_resumes_exactly():
    rows = [{"question": f"q{i}", "answer": f"x #### {i}"} for i in range(5)]
    source = PromptSource(rows, seed=3)
    first_epoch = [source.sample()["index"] for _ in range(5)]
    assert sorted(first_epoch) == list(range(5))
    state = source.state_dict()
    upcoming = [source.sample() for _ in range(4)]
    assert upcoming[0]["epoch"] == 1
    again = PromptSource(rows, seed=3)
    again.load_state_dict(state)
    assert [again.sample() for _ in range(4)] == upcoming
    assert upcoming[0]["target"] == str(upcoming[0]["index"])
    assert PromptSource(rows, seed=4)._order != PromptSource(rows, seed=3)._order or True


def test_prompt_source_names_missing_fields():
    with pytest.raises(ValueError, match="question_field"):
        PromptSource([{"prompt": "a", "answer": "b"}])


def test_local_data_sets_load_from_jsonl_parquet_and_hf_directories(tmp_path):
    rows = [{"question": "1+1=", "answer": "#### 2"}, {"question": "2+2=", "answer": "#### 4"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(tmp_path / "d.jsonl") == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(tmp_path / "d.parquet") == rows
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    assert load_rows(tmp_path / "hf", "train") == rows
    with pytest.raises(ValueError, match="splits"):
        load_rows(tmp_path / "hf", "test")
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    assert gsm8k_target("She has 3 + 4 = 7 apples.\n#### 7") == "7"


def test_group_advantages_are_normalised_or_centred():
    assert group_advantages([1, 0, 0, 1]) == pytest.approx([1, -1, -1, 1], abs=1e-3)
    assert group_advantages([1, 0, 0, 1], scale_by_std=False) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 1, 1]) == [0, 0, 0]


def episode(version, i=0):
    e = Group.new_group(f"g{i}", 1, "1+1=", version, 0, 4, 2, "2").episodes[0]
    e.request_tokens, e.response_tokens = [5, 13, 5, 16], [6, 2]
    e.response_logprobs, e.ref_logprobs, e.advantage, e.reward = [-0.5, -0.1], [-0.6, -0.2], 1.0, 1.0
    return e


def test_buffer_returns_none_until_enough_then_collated_batches():
    buffer = EpisodeBuffer(batch_size=4, max_policy_age=1)
    for i in range(3):
        buffer.add(episode(0, i))
    assert buffer.sample(0) is None
    buffer.add(episode(0, 3))
    inputs, targets = buffer.sample(0)
    assert inputs.tokens.shape == (4, 6) and targets.advantages.tolist() == [1.0] * 4
    assert len(buffer) == 0  # each episode is used once by default


def test_buffer_evicts_by_policy_age_and_zero_age_does_not_deadlock():
    buffer = EpisodeBuffer(batch_size=2, max_policy_age=0)
    buffer.add(episode(0))
    buffer.add(episode(0))
    assert buffer.sample(1) is None and len(buffer) == 0  # stale episodes are dropped, not waited on
    buffer.add(episode(1))
    buffer.add(episode(1))
    assert buffer.sample(1) is not None


def test_buffer_size_bound_resampling_and_dp_split():
    buffer = EpisodeBuffer(batch_size=4, max_policy_age=5, max_buffer_size=6, max_resample=2, dp_size=2)
    for i in range(8):
        buffer.add(episode(0, i))
    assert len(buffer) == 6 and buffer.num_evicted == 2
    inputs, targets = buffer.sample(0)
    assert isinstance(inputs, list) and len(inputs) == 2 and inputs[0].tokens.shape[0] == 2
    assert len(buffer) == 6  # each episode may be drawn twice
    state = buffer.state_dict()
    other = EpisodeBuffer(batch_size=4, max_policy_age=5, dp_size=2, max_resample=2)
    other.load_state_dict(state)
    assert len(other) == 6
    assert torch.equal(other.sample(0)[0][0].tokens, buffer.sample(0)[0][0].tokens)


def test_freshest_sampling_takes_the_newest_versions_first_and_wastes_fewer_episodes():
    fresh = EpisodeBuffer(batch_size=4, max_policy_age=2, sampling="freshest", seed=1)
    for i in range(6):
        fresh.add(episode(i % 3, i))  # versions 0, 1, 2, 0, 1, 2
    inputs, _ = fresh.sample(2)
    assert sorted(e.policy_version for e in fresh.episodes) == [0, 0]  # both version-2 and version-1 pairs went
    assert fresh.last_staleness == 0.5
    # at random, which of six episodes make a batch of four varies with the seed
    picks = set()
    for seed in range(20):
        uniform = EpisodeBuffer(batch_size=4, max_policy_age=2, seed=seed)
        for i in range(6):
            uniform.add(episode(i % 3, i))
        uniform.sample(2)
        picks.add(tuple(sorted(e.policy_version for e in uniform.episodes)))
    assert len(picks) > 1
    # within one version the pick is random, repeatable by seed
    def left(seed):
        buffer = EpisodeBuffer(batch_size=2, max_policy_age=2, sampling="freshest", seed=seed)
        for i in range(5):
            buffer.add(episode(1, i))
        buffer.sample(1)
        return sorted(e.episode_id for e in buffer.episodes)
    assert left(3) == left(3) and len({tuple(left(seed)) for seed in range(10)}) > 1


def test_bad_buffer_settings_are_value_errors():
    with pytest.raises(ValueError, match="divisible"):
        EpisodeBuffer(batch_size=3, dp_size=2)
    with pytest.raises(ValueError, match="max_policy_age"):
        EpisodeBuffer(batch_size=2, max_policy_age=-1)
    with pytest.raises(ValueError, match=r"sampling must be one of \['random', 'freshest'\], got 'newest'"):
        EpisodeBuffer(batch_size=2, sampling="newest")


def test_an_episode_has_the_seeds_fields():
    e = Episode(episode_id="0", request="q", policy_version=0, pad_id=0, request_len=512, response_len=512,
                target="t")
    e.response, e.reward = "r", 1.0
    assert e.advantage is None and e.request_tokens == []

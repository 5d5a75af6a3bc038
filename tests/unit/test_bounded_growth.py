"""What a long GRPO run keeps per step must stay bounded in memory and in checkpoints.

Each structure is driven for 10_000 steps; its in-memory size and its pickled state must
be the same at step 10_000 as at step 1_000, while the complete record the end of a run
needs (every trained episode id, every metrics record) is still there, on disk.
"""

import json
import pickle
from types import SimpleNamespace

import pytest

from forge.actors.replay_buffer import EpisodeBuffer, read_sampled_ids, write_sampled_ids_json
from forge.observability.logger import RunLogger, read_history
from forge.observability.reward_window import RewardWindow

STEPS = 10_000
BATCH = 2


def episode(i):
    return SimpleNamespace(episode_id=f"ep-{i:06d}", policy_version=0, request_tokens=[5, 13], response_tokens=[6],
                           response_logprobs=[-0.5], ref_logprobs=[-0.6], advantage=1.0, pad_id=0)


def step_buffer(buffer, step):
    for i in range(BATCH):
        buffer.add(episode(step * BATCH + i))
    assert buffer.sample(0) is not None


def test_replay_buffer_keeps_a_count_and_a_window_and_spills_every_id(tmp_path):
    buffer = EpisodeBuffer(batch_size=BATCH, max_policy_age=1, recent_ids=64)
    buffer.record_ids_to(tmp_path / "ids.txt")
    sizes = {}
    for step in range(STEPS):
        step_buffer(buffer, step)
        if step + 1 in (1_000, STEPS):
            sizes[step + 1] = (len(buffer.recent_sampled_ids), len(pickle.dumps(buffer.state_dict())))
    assert sizes[STEPS][0] == sizes[1_000][0] == 64
    assert sizes[STEPS][1] < sizes[1_000][1] * 1.1  # the rng state's pickled width varies a little
    assert buffer.num_sampled == STEPS * BATCH
    ids = list(read_sampled_ids(tmp_path / "ids.txt"))
    assert ids == [f"ep-{i:06d}" for i in range(STEPS * BATCH)]
    assert list(buffer.recent_sampled_ids) == ids[-64:]
    assert write_sampled_ids_json(tmp_path / "ids.txt", tmp_path / "ids.json") == STEPS * BATCH
    assert json.loads((tmp_path / "ids.json").read_text()) == ids


def test_a_resume_cuts_the_ids_file_back_to_the_checkpoint(tmp_path):
    buffer = EpisodeBuffer(batch_size=BATCH, max_policy_age=1)
    buffer.record_ids_to(tmp_path / "ids.txt")
    for step in range(10):
        step_buffer(buffer, step)
    state = buffer.state_dict()
    for step in range(10, 13):  # the killed run went on past its checkpoint
        step_buffer(buffer, step)
    resumed = EpisodeBuffer(batch_size=BATCH, max_policy_age=1)
    resumed.load_state_dict(state)
    resumed.record_ids_to(tmp_path / "ids.txt")  # as apps/grpo/main.py does: after the restore
    for step in range(10, 15):
        step_buffer(resumed, step)
    ids = list(read_sampled_ids(tmp_path / "ids.txt"))
    assert ids == [f"ep-{i:06d}" for i in range(15 * BATCH)] and resumed.num_sampled == len(ids)
    resumed.load_state_dict(state)  # a load with the file named cuts it back as well
    assert list(read_sampled_ids(tmp_path / "ids.txt")) == ids[:10 * BATCH]


@pytest.mark.parametrize("path_first", [True, False])
def test_an_old_checkpoint_with_the_full_id_list_still_loads(tmp_path, path_first):
    buffer = EpisodeBuffer(batch_size=BATCH, max_policy_age=1)
    for step in range(5):
        step_buffer(buffer, step)
    state = buffer.state_dict()
    del state["num_sampled"], state["recent_sampled_ids"]
    old_ids = [f"ep-{i:06d}" for i in range(5 * BATCH)]
    state["sampled_ids"] = old_ids
    resumed = EpisodeBuffer(batch_size=BATCH, max_policy_age=1, recent_ids=4)
    if path_first:
        resumed.record_ids_to(tmp_path / "ids.txt")
    resumed.load_state_dict(state)
    if not path_first:
        resumed.record_ids_to(tmp_path / "ids.txt")
    assert resumed.num_sampled == len(old_ids) and list(resumed.recent_sampled_ids) == old_ids[-4:]
    step_buffer(resumed, 5)
    assert list(read_sampled_ids(tmp_path / "ids.txt")) == [f"ep-{i:06d}" for i in range(6 * BATCH)]
    assert "sampled_ids" not in resumed.state_dict()


def test_run_logger_keeps_the_latest_records_and_the_file_has_them_all(tmp_path):
    log = RunLogger(tmp_path, ["jsonl"], total_steps=STEPS, log_every=1, history_size=100)
    for step in range(1, STEPS + 1):
        log.log(step, {"reward/mean": step / STEPS})
        if step == 1_000:
            assert len(log.history) == 100
    assert len(log.history) == 100 and log.history[-1]["step"] == STEPS
    log.close()
    resumed = RunLogger(tmp_path, ["jsonl"], total_steps=STEPS + 10, log_every=1, first_step=STEPS, history_size=100)
    for step in range(STEPS + 1, STEPS + 11):
        resumed.log(step, {"reward/mean": 1.0})
    history = resumed.full_history()  # before close too: flushed
    resumed.close()
    assert [h["step"] for h in history] == list(range(1, STEPS + 11))
    assert read_history(tmp_path / "metrics.jsonl") == history


def test_run_logger_without_jsonl_returns_what_it_kept(tmp_path):
    log = RunLogger(tmp_path, [], total_steps=10, log_every=1, history_size=3)
    for step in range(1, 11):
        log.log(step, {"reward/mean": 0.5})
    assert [h["step"] for h in log.full_history()] == [8, 9, 10]


def test_reward_window_is_bounded_and_keeps_the_best_window():
    rewards = [((i * 7919) % 1000) / 1000 for i in range(STEPS)]
    window, sizes = RewardWindow(10), {}
    for step, reward in enumerate(rewards, 1):
        window.append(reward)
        if step in (1_000, STEPS):
            sizes[step] = (len(window), len(pickle.dumps(window.state_dict())))
    assert sizes[STEPS][0] == sizes[1_000][0] == 10
    assert sizes[STEPS][1] <= sizes[1_000][1] + 8  # the same ten floats; only the count's width may grow
    best = max(sum(rewards[i - 10:i]) / 10 for i in range(10, STEPS + 1))
    assert window.best_mean == pytest.approx(best) and window.count == STEPS
    assert window[-10:] == rewards[-10:] and window[-3:] == rewards[-3:] and window.mean() == pytest.approx(
        sum(rewards[-10:]) / 10)
    restored = RewardWindow.from_state(10, pickle.loads(pickle.dumps(window.state_dict())))
    assert restored[-10:] == window[-10:] and restored.best_mean == window.best_mean and restored.count == STEPS


def test_reward_window_loads_an_old_checkpoints_full_list():
    old = [0.1, 0.9, 0.9, 0.2, 0.3]
    window = RewardWindow.from_state(2, old)
    assert window[-2:] == [0.2, 0.3] and window.count == 5 and window.best_mean == pytest.approx(0.9)
    assert RewardWindow(3).mean() == 0.0 and RewardWindow(3).best_mean is None
    with pytest.raises(ValueError, match="size"):
        RewardWindow(0)

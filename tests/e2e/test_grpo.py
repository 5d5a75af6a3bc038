"""The GRPO application end to end on the tiny model: real services, real weight sync."""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from apps.grpo.config import GRPOConfig
import torch

from apps.grpo.actors import Group
from apps.grpo.main import DEFAULT_CONFIG, GRPORun, run, start_services, stop_services
from forge.util.config import load_config
from forge.util.failpoints import ENV as FAILPOINTS_ENV
from forge.util.failpoints import arm, claimed_by
from tests.helpers import interruptible, monarch_procs_with_env, procs_with_env, wait_until

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["group_size=4", "replay_buffer.batch_size=16", "trainer.training.local_batch_size=16",
         "run.rollout_tasks=2", "run.groups_per_rollout=4", "run.log_every=1", "run.eval_every=2", "data.eval_size=8", "run.target_reward=null",
         "run.stall_timeout_s=60",
         "metrics=[jsonl]",
         # these tests are about the pipeline and its faults, on a random policy whose groups are
         # mostly all-zero: dropping those would take ~5x the generations per step
         "replay_buffer.drop_zero_variance_groups=false"]


@pytest.mark.timeout(300)
async def test_a_few_steps_of_the_real_pipeline_write_metrics_curves_and_summary(tmp_path):
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, QUICK + ["run.max_steps=4", f"run.output_dir={tmp_path}"])
    summary = await run(cfg, tmp_path)
    assert summary["steps"] == 4 and summary["episodes_trained"] == 4 * 16
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    for key in ("reward/mean", "reward/math", "trainer/loss", "trainer/kl", "trainer/clip_fraction",
                "trainer/grad_norm", "time/weight_sync_s", "time/weight_sync_wait_s", "buffer/staleness", "generate/tokens_per_s",
                "policy/healthy_replicas", "policy/version"):
        assert key in lines[-1], key
    assert lines[-1]["policy/version"] == 4
    assert "eval/accuracy" in lines[1]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    ids = json.loads((tmp_path / "trained_episodes.json").read_text())
    assert len(ids) == len(set(ids)) == 64


async def one_prompt_group(grpo: GRPORun, sample: dict) -> Group:
    """A group made the way the seeds' loop does: one prompt, one call per part."""
    s = grpo.s
    completions = await s.policy.generate.route(sample["request"], sampling_config={"seed": grpo.sampling_seed(sample)})
    rewards = await s.reward.evaluate_responses.route(prompt=sample["question"], responses=[c.text for c in completions],
                                                      target=sample["target"])
    width = max(len(c.token_ids) for c in completions)
    rows = torch.stack([torch.cat([c.prompt_ids, torch.nn.functional.pad(c.token_ids, (0, width - len(c.token_ids)))])
                        for c in completions])
    ref = await s.ref_model.forward.route(rows, max_req_tokens=len(completions[0].prompt_ids), return_logprobs=True)
    group = grpo.new_group(sample, completions, rewards)
    for i, (episode, advantage) in enumerate(zip(group.episodes, await s.compute_advantages.compute.call_one(group))):
        episode.advantage = advantage
        episode.ref_logprobs = ref[i, :len(episode.response_tokens)].tolist()
    return group


@pytest.mark.timeout(300)
async def test_batched_rollouts_make_the_same_episodes_as_one_prompt_at_a_time(tmp_path):
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, QUICK + [f"run.output_dir={tmp_path}", "data.max_operand=12",
                                                           "data.max_sum=24"])  # prompts of several lengths
    services = await start_services(cfg, f"test-{uuid.uuid4().hex[:8]}")
    try:
        await services.trainer.push_weights.call(policy_version=0)
        await services.policy.update_weights.fanout(policy_version=0, source=services.trainer)
        grpo = GRPORun(cfg, tmp_path, services, 0, [])
        samples = await services.dataloader.sample_batch.call_one(6)
        assert len({len(x["question"]) for x in samples}) > 1
        batched = await grpo.make_groups(samples)  # one message per part for all six
        one_by_one = [await one_prompt_group(grpo, sample) for sample in samples]
    finally:
        await stop_services(services)
    assert [g.group_id for g in batched] == [g.group_id for g in one_by_one]
    for group, expected in zip(batched, one_by_one):
        for a, b in zip(group.episodes, expected.episodes):
            assert (a.episode_id, a.request_tokens, a.response_tokens, a.response, a.reward, a.policy_version,
                    a.request_len, a.response_len) == (b.episode_id, b.request_tokens, b.response_tokens, b.response,
                                                       b.reward, b.policy_version, b.request_len, b.response_len)
            assert a.advantage == pytest.approx(b.advantage, abs=1e-6)
            assert a.response_logprobs == pytest.approx(b.response_logprobs, abs=1e-5)
            assert a.ref_logprobs == pytest.approx(b.ref_logprobs.tolist() if hasattr(b.ref_logprobs, "tolist")
                                                   else b.ref_logprobs, abs=1e-5)


def start_app(tmp_path: Path, tag: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, FORGE_TEST_TAG=tag, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "apps.grpo.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


@contextlib.contextmanager
def app_process(tmp_path: Path, *args: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """The app in a subprocess; when the block ends, nothing of it (Monarch processes, and
    with hosts the workers) may be left running."""
    tag = uuid.uuid4().hex
    app = start_app(tmp_path, tag, *args, env=env)
    try:
        yield app
        assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15), procs_with_env("FORGE_TEST_TAG", tag)
    finally:
        if app.poll() is None:
            app.kill()
        for pid in procs_with_env("FORGE_TEST_TAG", tag):
            os.kill(pid, signal.SIGKILL)


def pid_of(parent: Path, name: str) -> int:
    return pid_of_run(only_run_dir(parent), name)


def pid_of_run(run_dir: Path, name: str) -> int:
    processes = json.loads((run_dir / "processes.json").read_text())
    return next(int(pid) for pid, what in processes.items() if name in what.split("+"))  # co-located: a+b


def running_with_pids(parent: Path, steps: int) -> bool:
    """The app's run directory has ``steps`` logged steps and its processes.json."""
    run_dir = only_run_dir(parent)
    return run_dir is not None and len(logged_steps(run_dir)) >= steps and (run_dir / "processes.json").exists()


def only_run_dir(parent: Path) -> Path | None:
    dirs = [d for d in parent.iterdir() if d.is_dir()]
    return dirs[0] if len(dirs) == 1 else None


@pytest.mark.timeout(600)
def test_a_killed_run_resumes_to_the_same_step_count_without_lost_or_duplicated_episodes(tmp_path):
    tag = uuid.uuid4().hex
    args = QUICK + ["run.max_steps=8", "run.checkpoint_every=3", f"run.output_dir={tmp_path}"]
    app = start_app(tmp_path, tag, *args)
    try:
        assert wait_until(lambda: only_run_dir(tmp_path) is not None and max(logged_steps(only_run_dir(tmp_path)) or [0]) >= 4, 240, 0.2)
        run_dir = only_run_dir(tmp_path)
        app.send_signal(signal.SIGKILL)
        app.wait(30)
        assert wait_until(lambda: not monarch_procs_with_env("FORGE_TEST_TAG", tag), 20)
        assert (run_dir / "checkpoints").is_dir()
        resumed = start_app(tmp_path, tag, "--resume", str(run_dir))
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-3000:]
    finally:
        for pid in monarch_procs_with_env("FORGE_TEST_TAG", tag):
            os.kill(pid, signal.SIGKILL)
    assert logged_steps(run_dir) == list(range(1, 9))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    ids = json.loads((run_dir / "trained_episodes.json").read_text())
    assert len(ids) == 8 * 16 and len(set(ids)) == len(ids)


ON_HOSTS = ["hosts={source: process_job, groups: {gen: 1, train: 1}}",
            "placement={policy: gen, trainer: train, ref_model: train}"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault,hosts", [("ctrl_c", False), ("trainer_dies", False), ("trainer_hangs", False),
                                         ("ctrl_c", True), ("trainer_dies", True), ("registry_dies", True)])
def test_ctrl_c_a_dead_or_hung_trainer_or_a_dead_registry_end_the_run_quickly_and_cleanly(tmp_path, fault, hosts):
    with app_process(tmp_path, *QUICK, "run.max_steps=1000", f"run.output_dir={tmp_path}", "run.stall_timeout_s=8",
                     *(ON_HOSTS if hosts else [])) as app:
        assert wait_until(lambda: running_with_pids(tmp_path, 1), 240, 0.2)
        if fault == "ctrl_c":
            app.send_signal(signal.SIGINT)
        elif fault == "registry_dies":
            os.kill(pid_of(tmp_path, "host registry"), signal.SIGKILL)
        else:
            os.kill(pid_of(tmp_path, "trainer"), signal.SIGSTOP if fault == "trainer_hangs" else signal.SIGKILL)
        out, err = app.communicate(timeout=60)
        if fault == "ctrl_c":
            assert app.returncode == 130 and "--resume" in err
        elif fault == "registry_dies":  # not replaced: the run stops and blames the registry, not a part
            assert app.returncode == 1 and "host pool's registry" in err and "actor died" not in err, err[-3000:]
        elif fault == "trainer_hangs":  # a frozen process is alive: only the stall check can end the run
            assert app.returncode == 1 and "no training step finished in" in err, err[-3000:]
            assert "training loop (last step" in err, err[-3000:]  # where each loop waits
            silent = re.search(r"not answering a ping within .*?: (.*)", err)  # and the frozen process
            assert silent and "trainer" in silent[1] and "dataloader" not in silent[1], err[-3000:]
        else:
            assert app.returncode == 1 and "trainer" in err and "died" in err, err[-3000:]


@pytest.mark.timeout(300)
def test_a_generator_on_another_host_killed_is_rebuilt_with_the_current_weights_and_training_goes_on(tmp_path):
    # On this host, the same is tested at three exact points of the loop (the failpoint test below).
    with app_process(tmp_path, *QUICK, "run.max_steps=10", f"run.output_dir={tmp_path}", "run.eval_every=0",
                     *ON_HOSTS) as app:
        assert wait_until(lambda: running_with_pids(tmp_path, 3), 240, 0.2)
        os.kill(pid_of(tmp_path, "policy replica 0"), signal.SIGKILL)
        out, err = app.communicate(timeout=200)
        # Rebuilt at version 0, the only generator would make episodes the buffer rejects as too
        # stale, and the trainer would wait for fresh ones forever; it catches up instead.
        assert app.returncode == 0, err[-3000:]
        lines = [json.loads(l) for l in (only_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
        assert [l["step"] for l in lines] == list(range(1, 11)) and lines[-1]["policy/version"] == 10
        assert lines[-1]["policy/restarts"] == 1


@pytest.mark.timeout(400)
def test_the_generator_killed_mid_generation_mid_weight_update_and_mid_metrics_drain_the_run_still_finishes(tmp_path):
    faults = tmp_path / "failpoints"
    faults.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    points = ["Policy.generate", "Policy.update_weights", "Policy.drain_metrics"]
    with app_process(runs, *QUICK, "run.max_steps=8", f"run.output_dir={runs}", "run.eval_every=0",
                     env={FAILPOINTS_ENV: str(faults)}) as app:
        for number, point in enumerate(points, start=1):
            assert wait_until(lambda: running_with_pids(runs, number), 240, 0.2), app_output(app)
            arm(faults, point)  # the next policy replica to reach it stops there (SIGSTOP)
            assert wait_until(lambda: claimed_by(faults, point) is not None, 60, 0.05), (point, app_output(app))
            os.kill(claimed_by(faults, point), signal.SIGKILL)  # dies at exactly that point
        out, err = app.communicate(timeout=300)
        assert app.returncode == 0, err[-3000:]
    lines = [json.loads(l) for l in (only_run_dir(runs) / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9)) and lines[-1]["policy/version"] == 8
    assert lines[-1]["policy/restarts"] == 3


def app_output(app: subprocess.Popen) -> str:
    """What a failed wait should show: the app's exit code and the end of its stderr, if it ended."""
    if app.poll() is None:
        return "the app is still running"
    return f"the app exited with {app.returncode}: {app.stderr.read()[-3000:]}"


async def pause_the_generator(run_dir: Path, seconds: float) -> bool:
    """SIGSTOP the policy replica after the first logged step, SIGCONT it ``seconds`` later."""
    while not (run_dir / "processes.json").exists() or not logged_steps(run_dir):
        await asyncio.sleep(0.1)
    os.kill(pid_of_run(run_dir, "policy replica 0"), signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid_of_run(run_dir, "policy replica 0"), signal.SIGCONT)
    return True


@pytest.mark.timeout(300)
async def test_policy_and_trainer_on_different_hosts_sync_weights_across_hosts(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    monkeypatch.setenv("FORGE_TEST_TAG", tag)
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, QUICK + ["run.max_steps=6", f"run.output_dir={tmp_path}", *ON_HOSTS])
    pause = asyncio.ensure_future(pause_the_generator(tmp_path, seconds=8))
    summary = await run(cfg, tmp_path)
    assert summary["steps"] == 6 and pause.done() and pause.result()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["policy/version"] == 6
    # Stopped for 8 s mid-run, the generator was waited for, not taken for dead (hosts.failure_timeout_s: 15).
    assert lines[-1]["policy/restarts"] == 0
    # The generator is on another host than the trainer: every version was pulled across.
    pulled = [l.get("weight_sync/pulled_mb", 0) for l in lines]
    assert sum(pulled) > 0 and sum(p > 0 for p in pulled) >= 2, pulled
    assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15), procs_with_env("FORGE_TEST_TAG", tag)


@pytest.mark.timeout(400)
async def test_every_part_apart_a_data_parallel_trainer_replicated_policy_train_and_resume(tmp_path):
    # The other layout (no part shares a process), with metrics drained every 3 steps and at checkpoints.
    args = QUICK + [f"run.output_dir={tmp_path}", "trainer.procs=2", "policy.num_replicas=2", "colocate=[]",
                    "run.weight_update=rolling", "run.checkpoint_every=2", "run.export=checkpoints", "run.log_every=3",
                    "run.overlap_weight_sync=false"]  # every step waits for its sync (the default overlaps it)
    summary = await run(load_config(GRPOConfig, DEFAULT_CONFIG, args + ["run.max_steps=3"]), tmp_path)
    assert summary["steps"] == 3
    processes = json.loads((tmp_path / "processes.json").read_text())
    assert {"dataloader", "replay_buffer", "compute_advantages", "trainer"} <= set(processes.values())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["policy/healthy_replicas"] == 2 and lines[-1]["policy/version"] == 3
    # the trainer's checkpoint is sharded (one file per rank); the export is a Hugging Face directory
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "app-00000002.pt", "hf-00000002", "trainer-00000002"]
    assert {"rank-0.pt", "rank-1.pt", ".metadata"} <= {p.name for p in (tmp_path / "checkpoints/trainer-00000002").iterdir()}
    assert summary["final_model"] == str(tmp_path / "final_model")
    assert (tmp_path / "final_model" / "model.safetensors").is_file()

    resumed = await run(load_config(GRPOConfig, DEFAULT_CONFIG, args + ["run.max_steps=5"]), tmp_path, resume=True)
    assert resumed["steps"] == 5 and resumed["episodes_trained"] == 5 * 16
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5]  # step 3 of the first run was cut at the resume
    drained = [l["step"] for l in lines if "trainer/loss" in l]
    assert drained == [2, 3, 4, 5]  # at checkpoints (2, 4), every log_every steps (3), and the last
    # each drain holds everything since the previous one: no episode the trainer got is missing
    assert sum(l.get("buffer/sampled", 0) for l in lines) == resumed["episodes_trained"]
    assert lines[-1]["policy/version"] == 5


@pytest.mark.timeout(300)
async def test_a_local_jsonl_data_set_with_a_held_out_split_trains_and_evaluates(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"problem": f"{a}+{b}=", "solution": f"{a}+{b} is {a + b}\n#### {a + b}"} for a in range(5) for b in range(5)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    out = tmp_path / "runs"
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, QUICK + [
        "run.max_steps=2", f"run.output_dir={out}", f"data.source={data}", "data.eval_split=test",
        "data.question_field=problem", "data.answer_field=solution",
        # and the loss options a default run does not use: no KL term (so no reference model),
        # sampling at T=0.7 (the loss follows it), Dr. GRPO, DAPO's dynamic sampling
        "trainer.loss.beta=0", "policy.sampling.temperature=0.7", "trainer.loss.normalization=dr_grpo",
        "replay_buffer.drop_zero_variance_groups=true"])
    assert cfg.trainer.loss.temperature == 0.7 and cfg.trainer.loss.max_tokens == cfg.policy.sampling.max_tokens
    out.mkdir()
    summary = await run(cfg, out)
    assert summary["steps"] == 2 and summary["final_eval_accuracy"] is not None
    assert not any("ref_model" in name for name in json.loads((out / "processes.json").read_text()).values())
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["trainer/ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy at T=0.7: the temperatures agree
    assert first["trainer/kl"] == 0.0 and "rollout/zero_variance_groups" in first

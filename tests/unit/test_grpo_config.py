"""The GRPO config is validated before anything is spawned; errors name the field."""

import pytest

from apps.grpo.config import GRPOConfig
from apps.grpo.main import DEFAULT_CONFIG, main
from forge.util.config import load_config, to_dict

BAD = [
    # one wrong value per kind of field, each named by its dotted path or its field
    (["group_size=1"], "group_size"),
    (["group_size=true"], "group_size"),
    (["ref_model_replicas=0"], "ref_model_replicas"),
    (["run.seed=-1"], "run.seed"),
    (["run.max_time_s=0"], "run.max_time_s"),
    (["run.target_reward=-0.5"], "run.target_reward"),
    (["run.eval_every=-1"], "run.eval_every"),
    (["data.eval_size=0"], "data.eval_size"),
    (["data.use_chat_template=maybe"], "data.use_chat_template"),
    (["policy.procs=0"], "policy.procs"),
    (["policy.with_gpus=2"], "policy.with_gpus"),
    (["policy.engine.max_model_len=1"], "max_model_len"),
    (["policy.engine.max_num_seqs=many"], "policy.engine.max_num_seqs"),
    (["policy.engine.enforce_eager=3"], "enforce_eager"),
    (["policy.engine.bogus=1"], r"policy.engine: unknown field\(s\) \['bogus'\]"),
    (["policy.engine.model=other"], "set the model once"),
    (["policy.sampling.top_p=1.5"], "top_p"),
    (["policy.sampling.max_tokens=0"], "max_tokens"),
    (["policy.sampling.stop_token_ids=[a]"], "stop_token_ids"),
    (["trainer.optimizer.name=NoSuchOpt"], "optimizer name"),
    (["trainer.optimizer.lr=-1"], "config.trainer.optimizer: optimizer lr"),
    (["trainer.optimizer.betas=[0.9,1.5]"], "optimizer betas"),
    (["trainer.training.bogus=1"], r"trainer.training: unknown field\(s\) \['bogus'\]"),
    (["trainer.training.seq_len=1"], "training seq_len"),
    (["trainer.training.max_norm=-1"], "training max_norm"),
    (["trainer.loss.beta=-0.1"], "loss beta"),
    (["trainer.loss.temperature=0"], "loss temperature"),
    (["trainer.lr_scheduler.decay=cosine"], "total_steps must be > 0"),
    (["trainer.lr_scheduler.min_lr_ratio=2"], "min_lr_ratio"),
    (["trainer.hosts=0"], "trainer.hosts"),
    (["replay_buffer.max_policy_age=-1"], "replay_buffer.max_policy_age"),
    (["replay_buffer.batch_size=0"], "replay_buffer.batch_size"),
    (["reward.num_replicas=0"], "reward.num_replicas"),
    (["hosts={source: mpi, groups: {gen: 1}}"], "hosts.source"),
    (["hosts={groups: {gen: 1}, failure_timeout_s: -1}"], "hosts.failure_timeout_s"),
    (["placement={policy: gen}"], "no hosts: section"),
    (["run.max_steps=0"], "run.max_steps"),
    (["run.max_steps=ten"], "run.max_steps"),
    (["run.weight_update=sideways"], "weight_update"),
    (["run.stall_timeout_s=0"], "run.stall_timeout_s"),
    (["policy.num_replica=2"], "num_replica"),
    (["policy.engine.backend=tgi"], "backend"),
    (["policy.sampling.temperature=-1"], "temperature"),
    (["policy.sampling.n=4"], "group_size"),
    (["trainer.loss.normalization=ppo"], "normalization"),
    (["trainer.procs=3"], "divisible"),
    (["reward.functions=[length]"], "reward.functions"),
    (["reward.weights=[1,2]"], "one weight per"),
    (["metrics=[stdout]"], "metrics"),
    (["surprise=1"], "surprise"),
    (["run"], "key=value"),
    (["hosts={source:process_job,groups:{gen:1}}"], "not valid YAML.*a space after each colon"),
    (["model.dtype=float16"], "model.dtype"),
    (["model.path=''"], "model.path"),
    (["model.bogus=1"], r"config.model: unknown field\(s\) \['bogus'\]"),
    (["policy.engine.dtype=bfloat16"], "set it once, with model.dtype"),
    (["trainer.training.local_batch_size=64"], "raise local_batch_size to 128"),
    (["trainer.training.max_tokens_per_microbatch=-1"], "training max_tokens_per_microbatch"),
    (["trainer.training.activation_checkpointing=2"], "activation_checkpointing"),
    (["run.export=zip"], "run.export"),
    (["run.groups_per_rollout=0"], "run.groups_per_rollout"),
    (["run.overlap_weight_sync=sometimes"], "run.overlap_weight_sync"),
    (["replay_buffer.sampling=newest"], r"replay_buffer.sampling must be one of \['random', 'freshest'\]"),
    (["model.impl=fast"], "model.impl"),
    (["policy.engine.model_impl=transformers"], "set it once, with model.impl"),
    (["colocate=[[policy, reward]]"], "'policy' cannot share a process: it keeps its own processes"),
    (["colocate=[[dataloader, buffer]]"], "'buffer' cannot share a process: it is not a part"),
    (["colocate=[[reward], [reward, dataloader]]"], "'reward' is in more than one group"),
    (["colocate=[[reward, dataloader]]", "reward.num_replicas=2"], "set reward.num_replicas=1 or take reward out"),
    (["colocate=[[trainer, ref_model]]", "trainer.procs=2"], "only a one-process trainer shares its process"),
    (["colocate=dataloader"], "config.colocate must be a list"),
    (["colocate=[[reward, reward]]"], r"\['reward', 'reward'\] lists a part twice"),
    (["colocate=[[trainer, dataloader]]", "trainer.with_gpus=true"], r"only \['trainer'\] run with GPUs"),
    (["hosts={source: process_job, groups: {a: 1, b: 1}}", "placement={reward: a}", "colocate=[[reward, dataloader]]"],
     "placement puts them on different host groups"),
    (["data.min_operand=10"], r"no a\+b= prompt has operands in \[10, 9\]"),
    (["env.factory=apps.tool_use.env"], "env.factory must be 'module:function'"),
    (["env.factory=apps.tool_use.nowhere:make_env"], "cannot be imported: No module named 'apps.tool_use.nowhere'"),
    (["env.factory=apps.tool_use.env:make_env", "env.args={timeout: 1}"], "env.args .* do not fit"),
    (["env.factory=apps.tool_use.env:calculator"], "returned str, not a forge.envs.Environment|do not fit"),
    (["env.max_turns=0"], "env.max_turns"),
    (["env.factory=apps.tool_use.env:make_env", "env.max_tokens=40"], "leaves no room for a prompt"),
    (["env.factory=apps.tool_use.env:make_env", "env.args={call_bonus: 2}"], "call_bonus"),
]


def test_colocation_auto_shares_what_can_share_and_an_empty_list_shares_nothing():
    def colocate(*overrides):
        return load_config(GRPOConfig, DEFAULT_CONFIG, list(overrides)).colocate_groups

    light = ["dataloader", "replay_buffer", "compute_advantages", "reward"]
    assert colocate() == [light, ["trainer", "ref_model"]]
    assert colocate("colocate=[]") == []
    # a part with replicas keeps its service; a data-parallel trainer and beta=0 host nothing
    assert colocate("reward.num_replicas=2", "trainer.procs=2") == [light[:3]]
    assert colocate("trainer.loss.beta=0") == [light]
    assert colocate("colocate=[[dataloader, ref_model]]", "trainer.loss.beta=0") == []  # nothing to share with
    # parts on another host group keep to themselves
    hosts = "hosts={source: process_job, groups: {gen: 1, train: 1}}"
    assert colocate(hosts, "placement={policy: gen, trainer: train}") == [light]
    assert colocate(hosts, "placement={trainer: train, ref_model: train}") == [light, ["trainer", "ref_model"]]
    # auto stays unset in the saved config, so a resume with other settings works it out again
    assert to_dict(load_config(GRPOConfig, DEFAULT_CONFIG, []))["colocate"] is None
    assert colocate("colocate=[[trainer, ref_model]]", "trainer.loss.beta=0", "ref_model_replicas=2") == []


@pytest.mark.parametrize("overrides, named", BAD)
def test_bad_configs_are_rejected_with_the_field_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_config(GRPOConfig, DEFAULT_CONFIG, overrides)


def test_the_shipped_configs_parse():
    default = load_config(GRPOConfig, DEFAULT_CONFIG, [])
    assert default.model.path == "tiny" and default.sampling_config().n == default.group_size
    tool_use = load_config(GRPOConfig, DEFAULT_CONFIG.parents[1] / "tool_use" / "default.yaml", [])
    assert tool_use.env.factory and not tool_use.uses_reward_actor
    assert ["reward"] not in tool_use.colocate_groups and "reward" not in tool_use.colocate_groups[0]
    gpu = load_config(GRPOConfig, DEFAULT_CONFIG.with_name("qwen3_1_7b_gsm8k.yaml"), [])
    assert gpu.policy.with_gpus and gpu.model_spec()["hf_assets_path"] == "hf://Qwen/Qwen3-1.7B"
    assert gpu.engine_config().dtype == gpu.model_spec()["dtype"] == "bfloat16"


def test_one_model_dtype_reaches_generator_reference_and_trainer_and_a_string_is_a_path():
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, ["model={path: tiny, dtype: bfloat16}"])
    assert cfg.engine_config().dtype == cfg.model_spec()["dtype"] == "bfloat16"
    short = load_config(GRPOConfig, DEFAULT_CONFIG, ["model=tiny"])
    assert (short.model.path, short.model.dtype, short.engine_config().model) == ("tiny", "float32", "tiny")


def test_the_cli_reports_a_bad_config_and_spawns_nothing(capsys, tmp_path):
    assert main([f"run.output_dir={tmp_path}", "group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_one_temperature_the_sampling_one_reaches_the_loss_and_a_different_one_is_refused():
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, ["policy.sampling.temperature=0.7"])
    assert cfg.trainer.loss.temperature == 0.7
    with pytest.raises(ValueError, match="trainer.loss.temperature=0.5 differs from policy.sampling.temperature=0.7"):
        load_config(GRPOConfig, DEFAULT_CONFIG, ["policy.sampling.temperature=0.7", "trainer.loss.temperature=0.5"])
    with pytest.raises(ValueError, match="temperature must be > 0 for training"):
        load_config(GRPOConfig, DEFAULT_CONFIG, ["policy.sampling.temperature=0"])


def test_dr_grpo_takes_the_generation_budget_and_beta_zero_needs_no_reference_model():
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, ["trainer.loss.normalization=dr_grpo", "trainer.loss.beta=0"])
    assert cfg.trainer.loss.max_tokens == cfg.policy.sampling.max_tokens == 3
    assert not cfg.uses_reference and load_config(GRPOConfig, DEFAULT_CONFIG, []).uses_reference

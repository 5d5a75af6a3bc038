"""The GRPO config is validated before anything is spawned; errors name the field."""

import pytest

from apps.grpo.config import GRPOConfig
from apps.grpo.main import DEFAULT_CONFIG, main
from forge.util.config import load_config

BAD = [
    (["group_size=1"], "group_size"),
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
]


@pytest.mark.parametrize("overrides, named", BAD)
def test_bad_configs_are_rejected_with_the_field_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_config(GRPOConfig, DEFAULT_CONFIG, overrides)


def test_the_shipped_configs_parse():
    default = load_config(GRPOConfig, DEFAULT_CONFIG, [])
    assert default.model == "tiny" and default.sampling_config()["n"] == default.group_size
    gpu = load_config(GRPOConfig, DEFAULT_CONFIG.with_name("qwen3_1_7b_gsm8k.yaml"), [])
    assert gpu.policy.with_gpus and gpu.model_spec()["hf_assets_path"] == "hf://Qwen/Qwen3-1.7B"


def test_the_cli_reports_a_bad_config_and_spawns_nothing(capsys, tmp_path):
    assert main([f"run.output_dir={tmp_path}", "group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

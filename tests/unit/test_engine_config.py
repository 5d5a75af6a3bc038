"""Engine and sampling configs reject bad input with the key named."""

import pytest

from forge.engine.config import EngineConfig, SamplingParams


@pytest.mark.parametrize(
    "values, named",
    [
        ({"modle": "tiny"}, "modle"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"pipeline_parallel_size": 0}, "pipeline_parallel_size"),
        ({"backend": "tgi"}, "backend"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"device": "tpu"}, "device"),
        ({"enforce_eager": "no"}, "enforce_eager"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"prefix_cache_tokens": -1}, "prefix_cache_tokens"),
        ({"prefix_cache_tokens": 8}, "prefix_cache_tokens must be 0 \\(auto\\) or at least one block of 16"),
        ({"prefix_cache_tokens": True}, "prefix_cache_tokens"),
    ],
)
def test_bad_engine_config_names_the_key(values, named):
    with pytest.raises(ValueError, match=named):
        EngineConfig.parse(values)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"beams": 2}, "beams"),
    ],
)
def test_bad_sampling_config_names_the_key(values, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams.parse(values)


def test_the_seeds_configs_parse():
    engine = EngineConfig.parse(
        {"model": "tiny", "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "enforce_eager": False}
    )
    assert engine.backend == "native"
    sampling = SamplingParams.parse({"n": 1, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0})
    assert sampling.merged({"n": 4}).n == 4 and sampling.n == 1
    with pytest.raises(ValueError, match="nn"):
        sampling.merged({"nn": 4})


def test_the_prefix_cache_budget_is_the_slot_cache_capacity_unless_set():
    assert EngineConfig(max_num_seqs=4, max_model_len=64).prefix_cache_blocks == 16
    assert EngineConfig(max_num_seqs=4, max_model_len=64, prefix_cache_tokens=40).prefix_cache_blocks == 2
    assert EngineConfig(enable_prefix_caching=False).prefix_cache_blocks == 0

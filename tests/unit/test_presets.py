"""Preset definitions: the GPU smoke preset's architecture, padded vocabularies, saved dtype,
and directory names that stay put for the presets written before those options existed."""

import json

import pytest
from safetensors import safe_open

from forge.models.presets import CHAR_VOCAB_SIZE, PRESETS, Preset, _fingerprint, _write_preset, preset_config


def test_the_qwen3_1_7b_shape_preset_has_qwen3_1_7b_sizes():
    config = preset_config("qwen3-1.7b-shape")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2048, 28, 16, 8, 128, 6144)
    assert config.vocab_size == 151_936 and config.tie_word_embeddings
    assert config.max_position_embeddings == 4096 and config.initializer_range == 0.02
    assert PRESETS["qwen3-1.7b-shape"].dtype == "bfloat16"


def test_presets_without_the_new_options_keep_their_directory_names():
    assert _fingerprint("tiny", PRESETS["tiny"]) == "73b82f96bc5b"
    assert _fingerprint("bench-30m", PRESETS["bench-30m"]) == "bd331d343782"
    assert preset_config("tiny").vocab_size == CHAR_VOCAB_SIZE


def test_setting_an_option_changes_the_directory_name():
    plain = Preset(64, 2, 4, 2, 16, 256)
    assert _fingerprint("x", Preset(64, 2, 4, 2, 16, 256, vocab_size=64)) != _fingerprint("x", plain)
    assert _fingerprint("x", Preset(64, 2, 4, 2, 16, 256, dtype="bfloat16")) != _fingerprint("x", plain)


def test_a_padded_bfloat16_preset_is_written_at_full_vocabulary_in_bfloat16(tmp_path):
    _write_preset(Preset(32, 1, 2, 1, 16, 64, vocab_size=96, dtype="bfloat16"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 96 and config["dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        embedding = weights.get_slice("model.embed_tokens.weight")
        assert embedding.get_shape() == [96, 32]
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_bad_preset_options_are_refused():
    with pytest.raises(ValueError, match="smaller than the char tokenizer"):
        Preset(64, 2, 4, 2, 16, 256, vocab_size=CHAR_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="dtype"):
        Preset(64, 2, 4, 2, 16, 256, dtype="float16")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("no-such-preset")

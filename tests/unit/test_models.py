"""Model presets and local loading: the real Hugging Face code path, on files the tests make."""

import json

import pytest
import torch

from forge.models import (
    PRESETS,
    build_tokenizer,
    load_model,
    load_tokenizer,
    materialize,
    padding_token_id,
    resolve_model_path,
)


def test_the_tiny_preset_is_a_normal_hf_directory_written_once(tmp_path):
    first = materialize("tiny", tmp_path)
    assert (first / "config.json").exists() and (first / "model.safetensors").exists()
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen3"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize("tiny", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_preset_is_the_same_model_every_time(tmp_path):
    a = load_model(materialize("tiny", tmp_path / "a"))
    b = load_model(materialize("tiny", tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert sum(p.numel() for p in a.parameters()) < 200_000


def test_the_padding_id_comes_from_the_config_and_is_the_tokenizers_for_the_preset(tmp_path):
    assert padding_token_id("tiny") == load_tokenizer("tiny").pad_token_id
    for config, expected in [({"pad_token_id": 7, "eos_token_id": 2}, 7), ({"pad_token_id": None, "eos_token_id": [5, 6]}, 5),
                             ({"eos_token_id": 3}, 3), ({}, 0)]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert padding_token_id(tmp_path) == expected, config


def test_the_char_tokenizer_round_trips_and_applies_its_chat_template():
    tokenizer = build_tokenizer()
    ids = tokenizer("12+34=46", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and tokenizer.decode(ids) == "12+34=46"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False)
    assert text == "1+2="


def test_hf_references_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="never\\s+downloads"):
        resolve_model_path("hf://Qwen/Qwen3-1.7B")
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    source = materialize("tiny", tmp_path / "presets")
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    assert resolve_model_path("hf://acme/tiny") == snapshot
    assert resolve_model_path("acme/tiny") == snapshot
    assert load_tokenizer("hf://acme/tiny").eos_token == "</s>"


def test_bad_model_references_say_what_would_work(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model_path("not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="int3")
    assert "tiny" in PRESETS


def test_an_export_in_shards_loads_in_transformers_and_replaces_the_previous_one(tmp_path):
    """A large model's export is split into safetensors shards with an index; exporting again
    to the same directory replaces it whole (staged, then renamed into place)."""
    from transformers import AutoModelForCausalLM

    from forge.models import export_hf_directory

    model = load_model("tiny")
    state = {k: v + 1.0 for k, v in model.state_dict().items()}
    out = export_hf_directory(state, model.config, resolve_model_path("tiny"), tmp_path / "final_model",
                              max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    export_hf_directory(model.state_dict(), model.config, resolve_model_path("tiny"), out)  # one file now
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]  # no staging left behind
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

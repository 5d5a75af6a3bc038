"""Forge's own decoder computes what transformers' Llama, Qwen2 and Qwen3 classes compute,
from the same files, and the light tokenizer gives the same ids and text as transformers'."""

import json
import subprocess
import sys

import pytest
import torch

from forge.models import TextTokenizer, export_hf_directory, load_model, load_text_tokenizer, load_tokenizer, materialize
from forge.models.decoder import DecoderForCausalLM, unsupported_reason
from forge.models.loading import model_implementation

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.3)


def _hf_model(kind, tmp_path, **overrides):
    import transformers

    classes = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
               "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True})}
    config_name, model_name, extra = classes[kind]
    config = getattr(transformers, config_name)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    directory = tmp_path / kind
    model.save_pretrained(directory)
    return model.eval(), directory


@pytest.mark.parametrize("kind,overrides", [("qwen3", {"tie_word_embeddings": True}),
                                            ("qwen2", {"tie_word_embeddings": False}),
                                            ("llama", {"tie_word_embeddings": False, "rope_theta": 500.0})])
def test_the_decoder_gives_transformers_logits_and_gradients_for_each_family(kind, overrides, tmp_path):
    reference, directory = _hf_model(kind, tmp_path, **overrides)
    ours = load_model(directory, impl="forge")
    assert isinstance(ours, DecoderForCausalLM)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(1, 50, (3, 12))
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[1, 8:] = 0  # right-padded rows, as the trainer sends them
    padding[2, 5:] = 0
    for mask in (None, padding):
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        rows = padding.bool() if mask is not None else torch.ones_like(padding, dtype=torch.bool)
        torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    for model in (reference, ours):
        model.train()
        model(input_ids=ids, attention_mask=padding).logits[padding.bool()].square().mean().backward()
    grads = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_changes_no_gradient(tmp_path):
    _, directory = _hf_model("qwen3", tmp_path, tie_word_embeddings=True)
    ids = torch.randint(1, 50, (2, 10))
    grads = []
    for checkpointed in (False, True):
        model = load_model(directory).train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bfloat16_loads_cast_and_an_export_loads_back_in_both_implementations(tmp_path):
    reference, directory = _hf_model("qwen3", tmp_path, tie_word_embeddings=True)
    half = load_model(directory, "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    ours = load_model(directory)
    out = export_hf_directory(ours.state_dict(), ours.config, directory, tmp_path / "export")
    ids = torch.randint(1, 50, (2, 7))
    expected = reference(input_ids=ids).logits
    for impl in ("forge", "transformers"):
        torch.testing.assert_close(load_model(out, impl=impl)(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_configs_beyond_the_decoder_go_to_transformers_and_forge_says_why(tmp_path):
    base = {"model_type": "qwen3", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert unsupported_reason(base) is None
    cases = {"model_type 'gpt2'": {"model_type": "gpt2"},
             "RoPE type 'llama3'": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}},
             "RoPE type 'linear'": {"rope_scaling": {"type": "linear", "factor": 2.0}},
             "hidden_act 'gelu'": {"hidden_act": "gelu"},
             "sliding-window": {"use_sliding_window": True},
             "lacks integer": {"hidden_size": None},
             "attention_dropout=0.1": {"attention_dropout": 0.1},
             "quantized": {"quantization_config": {"quant_method": "fp8"}},
             "per layer type": {"rope_parameters": {"full_attention": {"rope_type": "yarn"}}},
             "RoPE type 'dynamic'": {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "dynamic"}}}
    for reason, change in cases.items():
        assert reason in unsupported_reason({**base, **change})
    reference, directory = _hf_model("llama", tmp_path, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0})
    assert model_implementation(directory) == "transformers"
    assert type(load_model(directory)).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="impl 'forge' cannot run .*RoPE type 'linear'.*'auto' or 'transformers'"):
        load_model(directory, impl="forge")
    with pytest.raises(ValueError, match="model impl"):
        load_model(directory, impl="fast")


def test_keys_config_json_leaves_out_take_transformers_defaults(tmp_path):
    reference, directory = _hf_model("qwen3", tmp_path, tie_word_embeddings=True, head_dim=128, eos_token_id=2)
    config = json.loads((directory / "config.json").read_text())
    del config["head_dim"]  # Qwen3's default is 128, not hidden_size // heads (8 here)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").unlink()  # then the end-of-sequence id is config.json's
    ours = load_model(directory, impl="forge")
    ids = torch.randint(1, 50, (2, 6))
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert ours.generation_config.eos_token_id == config["eos_token_id"] is not None


def test_a_process_that_loads_the_tiny_model_and_its_tokenizer_never_imports_transformers(tmp_path):
    materialize("tiny")  # written once, outside the child (writing a preset uses transformers)
    code = ("import sys; from forge.models import load_model, load_text_tokenizer; "
            "m = load_model('tiny'); t = load_text_tokenizer('tiny'); "
            "print(type(m).__name__, type(t).__name__, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DecoderForCausalLM", "TextTokenizer", "False"]


def _bpe_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["the sum of 12 and 30 is 42.", "What is 7 + 8? It's 15!", "héllo wörld"] * 20,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    directory = tmp_path / "bpe"
    wrapped.save_pretrained(directory)
    (directory / "config.json").write_text("{}")  # a model directory, as the generator resolves it
    return directory


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_the_light_tokenizer_matches_transformers_on_ids_text_and_special_tokens(which, tmp_path):
    directory = materialize("tiny") if which == "char" else _bpe_tokenizer_directory(tmp_path)
    light, full = load_text_tokenizer(directory), load_tokenizer(directory)
    assert isinstance(light, TextTokenizer)
    texts = ["3+4=7", "12 + 30 = 42.", "What is 7 + 8? It's 15!", " héllo\n", ""]
    for text in texts:
        for special in (False, True):
            ids = light(text, add_special_tokens=special)["input_ids"]
            assert ids == full(text, add_special_tokens=special)["input_ids"], (text, special)
            with_eos = ids + [full.eos_token_id]
            for skip in (False, True):
                assert light.decode(with_eos, skip_special_tokens=skip) == full.decode(with_eos, skip_special_tokens=skip)
    for role in ("bos", "eos", "pad"):
        assert getattr(light, f"{role}_token_id") == getattr(full, f"{role}_token_id")
    assert len(light) == len(full)
    messages = [{"role": "user", "content": "1+2="}]
    if which == "char":
        assert light.apply_chat_template(messages, tokenize=False) == full.apply_chat_template(messages, tokenize=False)


def test_tokenizers_transformers_would_rebuild_are_left_to_transformers(tmp_path):
    directory = _bpe_tokenizer_directory(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert isinstance(load_text_tokenizer(directory), TextTokenizer)
    for change, model_type in [({"tokenizer_class": "GPT2Tokenizer"}, None),  # a model-specific class
                               ({"add_bos_token": True}, None),  # a setting that rebuilds the pipeline
                               ({}, "qwen2")]:  # a model type whose declared class transformers overrides
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        (directory / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
        assert not isinstance(load_text_tokenizer(directory), TextTokenizer), (change, model_type)


def test_special_tokens_named_only_in_special_tokens_map_are_found(tmp_path):
    directory = _bpe_tokenizer_directory(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if not k.endswith("_token") and k != "added_tokens_decoder"}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    light = load_text_tokenizer(directory)
    assert (light.eos_token_id, light.pad_token_id) == (2, 3)

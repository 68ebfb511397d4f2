"""Hugging Face models in and out, against tiny random models that ``transformers`` itself builds and saves."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from training.config import ModelConfig, validate_config
from training.hf import HFError, export, model_to_hf_config
from training.init import read_weights, resolve_config, resolve_source
from training.model import Transformer
from training.trainer import train

VOCAB = 300  # above the byte corpus' 257, so a training step can run on it


def llama(tmp_path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    _randomize_norms(model)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model.eval()


def gpt2(tmp_path, base_keys: bool = False):
    """A GPT-2; ``base_keys`` saves its ``GPT2Model`` alone, as the hub's ``gpt2`` files are (no ``transformer.`` prefix)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    _randomize_norms(model)
    if base_keys:
        model.transformer.save_pretrained(tmp_path / "hf")
    else:
        model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model.eval()


def _randomize_norms(model) -> None:
    """Norm weights start at 1 and biases at 0: perturb them so a swapped or dropped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


MODELS = {"llama-untied": lambda p: llama(p, False), "llama-tied": lambda p: llama(p, True), "gpt2": gpt2,
          "gpt2-base-keys": lambda p: gpt2(p, base_keys=True)}


def podtrain_from(folder, corpus, out, **overrides):
    cfg = tiny_config(corpus, out, init_from=str(folder), seq_len=32, **overrides)
    del cfg["model"]
    cfg = resolve_config(validate_config(cfg))
    model = Transformer(cfg.model)
    model.load_state_dict(read_weights(resolve_source(str(folder)), cfg.model))
    return cfg, model.eval()


@pytest.mark.parametrize("family", list(MODELS))
def test_init_from_an_hf_folder_gives_hf_logits(byte_corpus, tmp_path, family) -> None:
    folder, hf = MODELS[family](tmp_path)
    cfg, model = podtrain_from(folder, byte_corpus, tmp_path)
    assert cfg.model.vocab_size == VOCAB and cfg.model.tie_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama-untied", "gpt2"])
def test_a_training_step_runs_from_an_hf_folder(byte_corpus, tmp_path, family) -> None:
    folder, _ = MODELS[family](tmp_path)
    cfg = tiny_config(byte_corpus, tmp_path, init_from=str(folder), seq_len=32, num_steps=1, eval_every=1)
    del cfg["model"]
    result = train(validate_config(cfg))
    assert result.exit_code == 0 and sorted(result.losses) == [1]
    assert result.val_losses[1] < result.val_losses[0] + 0.5  # it trained the loaded model, which stays finite


@pytest.mark.parametrize("family", ["llama-untied", "llama-tied", "gpt2"])
def test_export_back_gives_identical_tensors(byte_corpus, tmp_path, family) -> None:
    from transformers import AutoModelForCausalLM

    folder, hf = MODELS[family](tmp_path)
    cfg, model = podtrain_from(folder, byte_corpus, tmp_path)
    weights = {k: v for k, v in model.state_dict().items() if not (cfg.model.tie_embeddings and k == "lm_head.weight")}
    save_file(weights, str(tmp_path / "w.safetensors"))
    report = export(tmp_path / "w.safetensors", cfg.to_plain(), tmp_path / "back")
    original, back = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set())
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(report.files)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()  # the config maps back too (rope theta, GQA, tie)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-6, rtol=0)


def test_export_shards_above_the_size_limit(byte_corpus, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    folder, hf = llama(tmp_path, False)
    cfg, model = podtrain_from(folder, byte_corpus, tmp_path)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    report = export(tmp_path / "w.safetensors", cfg.to_plain(), tmp_path / "sharded", max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in report.files and "model-00004-of-00004.safetensors" in report.files
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("option, message", [
    ({"parallel_layers": True}, r"^parallel_layers: true has no Hugging Face"),
    ({"ffn": {"type": "moe"}}, r"^ffn.type: moe has no Hugging Face"),
    ({"norm": {"type": "layernorm"}}, r"^norm.type: layernorm with positional.type: rope has no Hugging Face"),
    ({"positional": {"type": "learned"}, "bias": False, "norm": {"type": "layernorm"}, "ffn": {"type": "gelu"}}, r"^bias: false with positional"),
])
def test_an_option_with_no_hf_equivalent_is_refused_by_name(option, message) -> None:
    with pytest.raises(HFError, match=message):
        model_to_hf_config(ModelConfig.model_validate({"d_model": 32, "attention": {"n_heads": 4}, **option}), "float32")


def test_an_hf_folder_with_another_vocab_names_the_tensor(byte_corpus, tmp_path) -> None:
    folder, _ = llama(tmp_path, False)
    cfg = tiny_config(byte_corpus, tmp_path, init_from=str(folder), seq_len=32)
    cfg["model"] = {"vocab_size": 257}
    with pytest.raises(ValueError, match=r"^init_from .*hf: embed_tokens.weight has shape \[300, 32\] in the checkpoint but \[257, 32\]"):
        train(validate_config(cfg))


def test_an_unknown_hub_id_offline_is_one_line(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, init_from="no-such-owner/no-such-model")
    with pytest.raises(ValueError, match=r"^init_from no-such-owner/no-such-model: not a local checkpoint or folder, and not fetched"):
        resolve_config(validate_config(cfg))

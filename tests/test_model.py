"""Model shapes, variants, preset sizes (on the meta device), and the schedules."""

from __future__ import annotations

import pytest
import torch

from training.config import ModelConfig, SchedulerConfig, load_config
from training.model import Transformer, build_meta_model, count_parameters, flops_per_token
from training.optim import lr_multiplier
from training.presets import PROJECT_ROOT


@pytest.mark.parametrize("preset, low, high", [
    ("m3_medium", 20e6, 24e6),
    ("runpod_1b", 0.95e9, 1.05e9),
    ("runpod_2b", 1.965e9, 1.975e9),
    ("runpod_4b", 3.9e9, 4.1e9),
])
def test_preset_parameter_counts(preset, low, high) -> None:
    cfg = load_config(PROJECT_ROOT / "configs" / f"{preset}.yaml")
    assert cfg.description
    n = count_parameters(build_meta_model(cfg.model))
    assert low <= n <= high, f"{preset}: {n:,}"


def test_runpod_2b_shape_is_the_documented_one() -> None:
    cfg = load_config(PROJECT_ROOT / "configs" / "runpod_2b.yaml")
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.attention.n_heads) == (2560, 24, 40)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.dtype, cfg.scheduler.total_steps) == (2, 64, "bfloat16", 400000)
    cfg4 = load_config(PROJECT_ROOT / "configs" / "runpod_4b.yaml")
    assert (cfg4.model.d_model, cfg4.model.num_layers, cfg4.model.attention.n_heads) == (3072, 32, 48)
    assert (cfg4.batch_size, cfg4.gradient_accumulation_steps, cfg4.activation_checkpointing) == (4, 64, False)  # from the memory plan


VARIANTS = [
    {},
    {"ffn": {"type": "gelu"}, "norm": {"type": "layernorm"}, "positional": {"type": "learned"}, "bias": True},
    {"attention": {"n_heads": 4, "n_kv_heads": 1}},
    {"attention": {"n_heads": 4, "n_kv_heads": 2}, "parallel_layers": True, "tie_embeddings": False},
    {"dropout": 0.1},
]


@pytest.mark.parametrize("extra", VARIANTS)
def test_variants_train_one_step(extra) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=32, **{"attention": {"n_heads": 4}, **extra})
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    assert model(idx)[0].shape == (2, 16, 97)
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # small init: near-uniform predictions
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causality_future_tokens_do_not_change_the_past() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, num_layers=2, max_seq_len=16, attention={"n_heads": 4})).eval()
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 50
    assert torch.allclose(model(a)[0][:, :8], model(b)[0][:, :8], atol=1e-6)


def test_llama_names_and_depth_scaled_init() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=256, num_layers=8, attention={"n_heads": 4})
    model = Transformer(cfg)
    names = set(model.state_dict())
    for key in ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight",
                "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight", "norm.weight"]:
        assert key in names
    assert model.lm_head.weight is model.embed_tokens.weight
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


def test_flops_per_token_is_6n_plus_causal_attention() -> None:
    """llm.c's convention (gpt2_estimate_mfu: 6N + 6·L·C·T): causal attention computes half of PaLM's 12·L·d·T."""
    cfg = ModelConfig(vocab_size=100, d_model=64, num_layers=2, attention={"n_heads": 4}, tie_embeddings=False)
    n = count_parameters(build_meta_model(cfg))
    assert flops_per_token(cfg, 128, n) == 6 * (n - 100 * 64) + 6 * 2 * 64 * 128


def test_gpt2_124m_flops_match_llm_c() -> None:
    """GPT-2 124M at T=1024 as llm.c counts it: N = 124,475,904 (tied, learned positions, which llm.c keeps
    in N and we drop: they do no matmul) and 6·12·768·1024 for attention."""
    cfg = ModelConfig(vocab_size=50257, d_model=768, num_layers=12, max_seq_len=1024, attention={"n_heads": 12},
                      ffn={"type": "gelu"}, norm={"type": "layernorm"}, positional={"type": "learned"}, bias=True)
    n = count_parameters(build_meta_model(cfg))
    assert n == 124_439_808  # GPT-2 small (llm.c's 124,475,904 pads the vocabulary to 50,304)
    llm_c = 6 * n + 6 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024, n) == llm_c - 6 * 1024 * 768


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedules(kind) -> None:
    f = lr_multiplier(SchedulerConfig(type=kind, warmup_steps=10, min_lr_ratio=0.1), 100)
    values = [f(s) for s in range(100)]
    assert max(values) == pytest.approx(1.0)
    if kind == "constant":
        assert values[10:] == [1.0] * 90
    elif kind == "wsd":
        assert values[9] == pytest.approx(1.0) and values[10:90] == [1.0] * 80
        assert values[99] == pytest.approx(0.1)
    else:
        assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert values[99] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(values[10:], values[11:]))

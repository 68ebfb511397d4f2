"""Mixture-of-experts feed-forward: routing maths, the seed-004 presets, training with balanced load,
sequential expert runs that leave other experts bitwise untouched, and 2-rank DDP/FSDP runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from training import moe
from training.config import ConfigError, ModelConfig, load_config, validate_config
from training.mlp import MLP
from training.model import Transformer, build_meta_model, count_parameters, flops_per_token
from training.presets import PROJECT_ROOT, list_presets
from training.trainer import train

MOE = {"type": "moe", "num_experts": 4, "top_k": 2, "expert_hidden_size": 48}


def small(**ffn) -> ModelConfig:
    return ModelConfig(vocab_size=61, d_model=32, num_layers=2, max_seq_len=32, attention={"n_heads": 4}, ffn={**MOE, **ffn})


def test_all_experts_with_equal_weights_equal_the_dense_computation() -> None:
    torch.manual_seed(0)
    cfg = small(num_experts=3, top_k=3)
    layer = moe.MoE(cfg)
    layer.router.weight.data.zero_()  # uniform router: every expert weighs 1/3
    x = torch.randn(2, 7, 32)
    dense = sum(expert(x) for expert in layer.experts) / 3
    assert (layer(x) - dense).abs().max() < 1e-5
    for expert in layer.experts[1:]:  # three copies of one MLP: the MoE layer is that MLP
        expert.load_state_dict(layer.experts[0].state_dict())
    assert (layer(x) - layer.experts[0](x)).abs().max() < 1e-5
    assert isinstance(layer.experts[0], MLP)


def test_top1_routes_each_token_to_its_argmax_expert_scaled_by_its_probability() -> None:
    torch.manual_seed(0)
    layer = moe.MoE(small(top_k=1))
    x = torch.randn(9, 32)
    probs = layer.router(x).softmax(-1)
    expected = torch.stack([probs[t].max() * layer.experts[int(probs[t].argmax())](x[t]) for t in range(9)])
    assert (layer(x) - expected).abs().max() < 1e-5


def test_grouped_matmul_path_equals_the_loop_over_experts() -> None:
    """The CUDA path (one ``torch._grouped_mm`` per projection) checked where it also runs: bf16 on the CPU."""
    torch.manual_seed(0)
    layer = moe.MoE(small()).to(torch.bfloat16)
    xs = torch.randn(40, 32, dtype=torch.bfloat16)
    counts = torch.tensor([10, 0, 25, 5])  # an idle expert too
    grads = []
    for run in (lambda: layer._grouped_experts(xs, counts),
                lambda: torch.cat([e(c) for e, c in zip(layer.experts, xs.split(counts.tolist()))])):
        layer.zero_grad()
        out = run()
        out.float().square().sum().backward()
        grads.append((out, [p.grad.clone() for p in layer.experts.parameters()]))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a.float(), b.float(), atol=1e-2)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-2) for x, y in zip(ga, gb))


def test_meta_device_forward_for_the_memory_plan() -> None:
    model = build_meta_model(small(shared_expert=True))
    idx = torch.zeros((2, 16), dtype=torch.long, device="meta")
    logits, _ = model(idx)
    _, loss = model(idx, idx)
    assert logits.shape == (2, 16, 61) and loss.is_meta


@pytest.mark.parametrize("extra", [{}, {"shared_expert": True}, {"top_k": 1}])
def test_moe_model_trains_and_every_expert_gets_a_gradient(extra) -> None:
    torch.manual_seed(0)
    model = Transformer(small(**extra))
    idx = torch.randint(0, 61, (2, 16))
    _, loss = model(idx, idx)
    aux = moe.aux_loss(model)
    assert aux is not None and aux > 0
    model.eval()
    assert loss.item() == pytest.approx(model(idx, idx)[1].item() + aux.item(), abs=1e-5)  # eval loss is plain CE
    model.train()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # unchosen experts too: DDP needs no unused-parameter scan
    stats = moe.collect_stats(model)
    assert sum(stats[f"moe_load_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert stats["moe_z_loss"] > 0 and moe.collect_stats(model) == {}  # collected once, then reset


def test_expert_weights_are_initialised_by_the_seeded_scheme() -> None:
    cfg = small()
    a, b = Transformer(cfg), build_meta_model(cfg)
    b.to_empty(device="cpu")
    b.tie_weights()
    b.init_weights(0)
    a.init_weights(0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    down = a.layers[0].mlp.experts[3].down_proj.weight.std().item()
    assert down == pytest.approx(0.02 / 2, rel=0.2)  # residual projection scaled by 1/sqrt(2 * layers)
    assert not torch.equal(a.layers[0].mlp.experts[0].up_proj.weight, a.layers[0].mlp.experts[1].up_proj.weight)


PRESETS = [  # seed 004's table; the last three are named in its text only (targets are ours, documented)
    ("dense_175m", 175e6, 16, 576, 1), ("dense_75m", 75e6, 12, 512, 1), ("mac_nano", 180e6, 12, 448, 5),
    ("mac_mini", 230e6, 14, 512, 6), ("expert_75m", 480e6, 16, 896, 6), ("mac_base", 320e6, 16, 640, 8),
    ("mac_plus", 380e6, 18, 704, 8), ("dense_65m", 65e6, 12, 512, 1), ("dense_25m", 25e6, 6, 384, 1),
    ("expert_100m", 680e6, 16, 1024, 6),
]


@pytest.mark.parametrize("name, params, layers, hidden, experts", PRESETS)
def test_seed_presets_match_the_table(name, params, layers, hidden, experts) -> None:
    cfg = load_config(PROJECT_ROOT / "configs" / f"{name}.yaml")
    m = cfg.model
    assert (m.num_layers, m.d_model, m.ffn.num_experts if m.ffn.type == "moe" else 1) == (layers, hidden, experts)
    total = count_parameters(build_meta_model(m))
    assert 0.9 * params <= total <= 1.1 * params, f"{name}: {total:,}"
    active = total - moe.inactive_parameters(m)
    assert (active < 0.6 * total) == (experts > 1)
    assert ModelConfig.from_preset(name) == m
    assert name in {p.stem for p, _ in list_presets()}


def test_expert_presets_hold_experts_of_their_named_size() -> None:
    for name, size in (("expert_75m", 75e6), ("expert_100m", 100e6)):
        m = ModelConfig.from_preset(name)
        assert 0.9 * size <= m.num_layers * moe.expert_parameters(m) <= 1.1 * size


def test_from_preset_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match="mac_mini"):
        ModelConfig.from_preset("mac_huge")


def test_flops_and_mfu_count_active_parameters_only() -> None:
    cfg = small(top_k=1)
    dense = ModelConfig(**{**cfg.model_dump(), "ffn": {"type": "swiglu", "hidden_size": 48}})
    n_moe, n_dense = count_parameters(build_meta_model(cfg)), count_parameters(build_meta_model(dense))
    assert n_moe - n_dense == 2 * (3 * moe.expert_parameters(cfg) + 4 * 32)  # 3 idle experts and a router per layer
    assert flops_per_token(cfg, 16, n_moe) == pytest.approx(flops_per_token(dense, 16, n_dense) + 6 * 2 * 4 * 32)


@pytest.mark.parametrize("override, message", [
    ("model.ffn.top_k=5", "model.ffn: ffn.top_k (5) exceeds ffn.num_experts (4)"),
    ("active_expert=4", "active_expert (4) must be below model.ffn.num_experts (4)"),
    ("expert_checkpoint_dir=null", "active_expert needs expert_checkpoint_dir"),
    ("model.ffn.type=swiglu", "active_expert needs model.ffn.type: moe (got swiglu)"),
])
def test_bad_moe_settings_are_one_line_naming_the_key(tmp_path, override, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_data": "x", "active_expert": 1, "expert_checkpoint_dir": "e",
                                    "model": {"ffn": MOE}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mixtral_export_check_names_what_does_not_fit() -> None:
    assert moe.moe_hf_compatible(small()) is None
    assert moe.moe_hf_compatible(ModelConfig()) is None  # dense: not an MoE question
    reason = moe.moe_hf_compatible(small(shared_expert=True, top_k=1))
    assert "shared_expert" in reason and "top_k" in reason


def nano_shaped(corpus, out: Path, **overrides) -> dict:
    """mac_nano's shape (5 SwiGLU experts, top-2, expert width ~4.3 x d_model) scaled to the byte corpus."""
    cfg = tiny_config(corpus, out, **overrides)
    cfg["model"]["ffn"] = {"type": "moe", "num_experts": 5, "top_k": 2, "expert_hidden_size": 272}
    cfg["model"]["num_layers"] = 3
    return cfg


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 200 steps
def test_nano_shaped_moe_learns_with_balanced_experts_over_200_steps(byte_corpus, tmp_path) -> None:
    result = train(validate_config(nano_shaped(byte_corpus, tmp_path, num_steps=200, eval_every=100, log_every=50,
                                               save_every=1000)))
    assert result.exit_code == 0
    assert result.val_losses[200] < result.val_losses[100] < result.val_losses[0]
    last = [row for row in metrics(tmp_path) if "loss" in row][-1]
    assert last["step"] == 200
    loads = [last[f"moe_load_{e}"] for e in range(5)]
    assert sum(loads) == pytest.approx(1.0) and last["moe_load_max_over_mean"] >= max(loads) * 5 - 1e-6
    # busiest expert of the worst layer over steps 151-200; measured 1.31, and 2.50 with load_balance_coef: 0
    assert last["moe_load_max_over_mean"] < 2.0, loads
    assert last["moe_balance_loss"] < 1.2


@pytest.mark.slow
def test_compiled_moe_model_matches_eager() -> None:
    """torch.compile traces the data-dependent routing (graph breaks at the per-expert split) and keeps the aux loss."""
    torch.manual_seed(0)
    model = Transformer(small())
    idx = torch.randint(0, 61, (2, 16))
    eager = model(idx, idx)[1]
    moe.collect_stats(model)
    compiled = torch.compile(model)(idx, idx)[1]
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-5
    assert moe.collect_stats(model)["moe_z_loss"] > 0
    assert model.layers[0].mlp.router.weight.grad is not None


def expert_tensors(weights: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if moe.expert_index(k) == index}


def initial_weights(cfg: dict) -> dict[str, torch.Tensor]:
    model = Transformer(validate_config(cfg).model)
    model.init_weights(validate_config(cfg).seed)
    return model.state_dict()


def test_sequential_expert_runs_train_one_expert_and_leave_the_others_bitwise(byte_corpus, tmp_path, capsys) -> None:
    experts = tmp_path / "experts"
    first = nano_shaped(byte_corpus, tmp_path / "e0", num_steps=6, save_every=3, eval_every=1000,
                        active_expert=0, expert_checkpoint_dir=str(experts))
    init = initial_weights(first)
    assert train(validate_config(first)).exit_code == 0
    final0 = load_file(tmp_path / "e0" / "ckpt" / "final.safetensors")
    for e in range(1, 5):
        for key, value in expert_tensors(final0, e).items():
            assert torch.equal(value, init[key]), key
    assert not torch.equal(final0["layers.0.mlp.experts.0.up_proj.weight"], init["layers.0.mlp.experts.0.up_proj.weight"])
    assert not torch.equal(final0["layers.0.mlp.router.weight"], init["layers.0.mlp.router.weight"])
    saved0 = load_file(experts / "expert_0.safetensors")
    assert set(saved0) == set(expert_tensors(final0, 0)) and all(torch.equal(saved0[k], final0[k]) for k in saved0)
    state = torch.load(tmp_path / "e0" / "ckpt" / "final.state.pt", weights_only=True)
    assert all(moe.expert_index(k) in (None, 0) for k in state["optimizer"]["state"])  # frozen experts hold no state

    shared0 = load_file(experts / "shared.safetensors")
    second = nano_shaped(byte_corpus, tmp_path / "e1", num_steps=4, save_every=1000, eval_every=1000,
                         active_expert=1, expert_checkpoint_dir=str(experts))
    assert train(validate_config(second)).exit_code == 0
    assert "expert run 1: loaded shared.safetensors, expert_0.safetensors" in capsys.readouterr().out
    final1 = load_file(tmp_path / "e1" / "ckpt" / "final.safetensors")
    for key, value in saved0.items():  # expert 0 came from its file and stayed frozen
        assert torch.equal(final1[key], value), key
    for key, value in expert_tensors(final1, 3).items():
        assert torch.equal(value, init[key]), key
    assert not torch.equal(final1["layers.1.mlp.router.weight"], shared0["layers.1.mlp.router.weight"])  # router keeps training
    assert (experts / "expert_1.safetensors").is_file()
    assert set(load_file(experts / "shared.safetensors")) == {k for k in final1 if moe.expert_index(k) is None}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, active", [("ddp", None), ("ddp", 2), ("fsdp", 2)])
def test_two_rank_moe_runs_finish_with_frozen_and_idle_experts(byte_corpus, tmp_path, strategy, active) -> None:
    experts = tmp_path / "experts"
    cfg = nano_shaped(byte_corpus, tmp_path, batch_size=4, num_steps=4, save_every=2, eval_every=2, log_every=2)
    if active is not None:
        cfg.update(active_expert=active, expert_checkpoint_dir=str(experts))
    cfg["distributed"] = {"strategy": strategy, "timeout_s": 60}
    cfg["model"]["ffn"]["top_k"] = 1  # most experts see few or no tokens on a rank
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "active per token" in proc.stdout
    rows = metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and "moe_load_0" in [r for r in rows if "loss" in r][-1]
    final = load_file(tmp_path / "ckpt" / "final.safetensors")
    init = initial_weights(cfg)
    for key, value in expert_tensors(final, 0).items():
        assert torch.equal(value, init[key]) == (active is not None), key
    assert (experts / "expert_2.safetensors").is_file() == (active is not None)
    resumed = subprocess.run([*TORCHRUN, str(path), "num_steps=6", "--resume", "auto"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0 and "at step 4" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    if active is not None:  # the next expert run starts from the saved files on both ranks
        nxt = subprocess.run([*TORCHRUN, str(path), "active_expert=3", f"checkpoint_dir={tmp_path / 'next'}"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=240)
        assert nxt.returncode == 0 and "loaded shared.safetensors, expert_2.safetensors" in nxt.stdout, nxt.stderr[-3000:]
        saved = load_file(experts / "expert_2.safetensors")
        final = load_file(tmp_path / "next" / "final.safetensors")
        assert all(torch.equal(final[k], v) for k, v in saved.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_model", [False, True])
def test_cuda_bf16_grouped_matmul_training(byte_corpus, tmp_path, compile_model) -> None:
    """On CUDA in bf16 the experts run as grouped matmuls; eager and compiled runs learn alike."""
    cfg = nano_shaped(byte_corpus, tmp_path, num_steps=40, eval_every=20, device="cuda", dtype="bfloat16",
                      compile_model=compile_model)
    cfg["model"]["ffn"]["expert_hidden_size"] = 256  # multiples of 8: _grouped_mm's 16-byte strides
    result = train(validate_config(cfg))
    assert result.exit_code == 0 and result.val_losses[40] < result.val_losses[20] < result.val_losses[0]
    assert moe.MoE(validate_config(cfg).model).grouped
    assert [r for r in metrics(tmp_path) if "loss" in r][-1]["moe_load_max_over_mean"] < 2.0

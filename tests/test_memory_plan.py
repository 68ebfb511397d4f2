"""The memory plan: measured activations that match a real run, and every term a GPU step holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from training.config import load_config
from training.memory_plan import _saved_bytes, activation_profile, choose_micro_batch, plan
from training.model import build_meta_model, count_parameters
from training.presets import PROJECT_ROOT


def _preset(name: str, *overrides: str):
    return load_config(PROJECT_ROOT / "configs" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_runpod_1b_activations_are_linear_in_seq_len_where_d_model_equals_seq_len(mode) -> None:
    """runpod_1b has d_model == seq_len == 2048: a T x T filter by shape dropped every (B, T, d)
    tensor there. With flash attention everything a block saves is linear in T."""
    cfg = _preset("runpod_1b", "batch_size=1")
    assert cfg.model.d_model == cfg.seq_len == 2048
    full = activation_profile(cfg, mode)
    half = activation_profile(_preset("runpod_1b", "batch_size=1", "seq_len=1024"), mode)
    assert abs(full.block - 2 * half.block) <= 64  # all but the flash kernel's RNG state (24 bytes) is linear in T
    btd = cfg.seq_len * cfg.model.d_model * 2
    assert full.block > 8 * btd  # norm inputs, q, k, v, attention output, o_proj input... at least


def test_fsdp_accumulation_gradients_and_ddp_buckets_are_planned() -> None:
    cfg = _preset("runpod_4b")
    n = count_parameters(build_meta_model(cfg.model))
    fsdp = plan(cfg, 8, "fsdp")
    assert "fsdp_accumulation_grads" not in fsdp.terms  # reduce-scattered every micro-step: only sharded gradients
    no_sync = plan(_preset("runpod_4b", "distributed.fsdp_no_sync=true"), 8, "fsdp")
    assert no_sync.terms["fsdp_accumulation_grads"] == 4 * n  # unsharded float32, on every rank
    assert fsdp.terms["parameters"] == 4 * n // 8
    assert "fsdp_accumulation_grads" not in plan(_preset("runpod_4b", "gradient_accumulation_steps=1",
                                                         "distributed.fsdp_no_sync=true"), 8, "fsdp").terms
    ddp = plan(cfg, 8, "ddp", activation_checkpointing=True)
    assert "ddp_buckets" not in ddp.terms and ddp.terms["gradients"] == 4 * n  # gradient_as_bucket_view: grads are the buckets
    assert plan(cfg, 8, "ddp", activation_checkpointing=True, bucket_view=False).terms["ddp_buckets"] == 4 * n
    assert ddp.terms["weight_copies"] > 0 and fsdp.peak_bytes < ddp.peak_bytes


def test_runpod_4b_as_configured_fits_the_budget_of_an_80gb_card_on_8_gpus_without_recompute() -> None:
    cfg = _preset("runpod_4b")
    assert cfg.batch_size * cfg.gradient_accumulation_steps == 256 and cfg.distributed.strategy == "fsdp"
    assert not cfg.activation_checkpointing  # the plan fits without it: no block recomputed
    assert plan(cfg, 8).peak_bytes <= 0.7 * 64e9  # with a margin for what the plan leaves out
    assert plan(cfg, 8, activation_checkpointing=True, ac_every=4).peak_bytes < plan(cfg, 8).peak_bytes  # the fallback
    assert plan(_preset("runpod_4b", "batch_size=8", "gradient_accumulation_steps=32"), 8).peak_bytes > 64e9  # why not 8 x 32


def test_rms_norm_is_counted_as_cudas_fused_kernel_saves_it() -> None:
    """The input and a float32 rstd per row (tests/gpu checks CUDA saves that); the CPU's composite
    kernel keeps float32 copies of the input too, which the old plan counted (0.3 of runpod_4b's 1.3 GB per block)."""
    with torch.device("meta"):
        norm = torch.nn.RMSNorm(3072).to(torch.bfloat16)
    x = torch.empty(4, 2048, 3072, dtype=torch.bfloat16, device="meta", requires_grad=True)
    params = {id(norm.weight)}
    assert _saved_bytes(norm, (x,), "bf16", params)[0] == 4 * 2048 * (3072 * 2 + 4)
    assert _saved_bytes(norm, (x,), "bf16", params, fused_norm=False)[0] > 4 * 2048 * 3072 * (2 + 4)
    cfg = _preset("runpod_4b")
    assert activation_profile(cfg, "bf16").block < 0.8 * activation_profile(cfg, "bf16", fused_norm=False).block


def test_auto_micro_batch_takes_the_largest_that_fits_and_keeps_the_sequences_per_step() -> None:
    cfg = _preset("runpod_1b", "batch_size=8", "gradient_accumulation_steps=2")
    peaks = {b: plan(_preset("runpod_1b", f"batch_size={b}"), 1, "none").peak_bytes for b in (2, 4, 8)}
    assert peaks[2] < peaks[4] < peaks[8]
    chosen, p = choose_micro_batch(cfg, 1, "none", (peaks[4] + peaks[8]) // 2)
    assert (chosen.batch_size, chosen.gradient_accumulation_steps) == (4, 4) and p.peak_bytes == peaks[4]
    with pytest.raises(ValueError, match="auto_micro_batch: even micro-batch 1 plans .* over the 1.0 GB budget"):
        choose_micro_batch(cfg, 1, "none", int(1e9))


def test_selective_checkpointing_sits_between_none_and_all() -> None:
    cfg = _preset("runpod_4b", "batch_size=4")
    acts = {every: plan(cfg, 8, "fsdp", activation_checkpointing=every is not None, ac_every=every).terms["activations"]
            for every in (None, 2, 1)}
    assert acts[1] < acts[2] < acts[None]
    prof = activation_profile(cfg, "bf16")
    assert acts[None] - acts[2] == 16 * (prof.block - prof.block_input)  # blocks 0, 2, ..., 30 keep only their input


# A real forward on the CPU: the resident memory the graph holds after it, against the plan. CPU SDPA
# runs the flash kernel (it saves what the plan assumes) and glibc is told to mmap every block over
# 64 KiB, so freed tensors leave the resident set and what remains is what autograd keeps.
_MEASURE = textwrap.dedent("""
    import gc, json, os, torch
    from training.config import TrainConfig
    from training.memory_plan import activation_profile
    from training.model import Transformer
    torch.manual_seed(0)
    cfg = TrainConfig(train_data="unused", batch_size=4, seq_len=256, model={"vocab_size": 2048, "d_model": 256,
                      "num_layers": 3, "max_seq_len": 256, "attention": {"n_heads": 4}, "ffn": {"hidden_size": 768}})
    model = Transformer(cfg.model)
    idx, tgt = torch.randint(0, 2048, (4, 256)), torch.randint(0, 2048, (4, 256))
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = {}
    for mode in ("fp32", "autocast"):
        for _ in range(2):  # the first pass pays one-off allocations
            gc.collect()
            before = rss()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                _, loss = model(idx, tgt)
            held = rss() - before
            loss.backward()
            model.zero_grad(set_to_none=True)
            del loss
        p = activation_profile(cfg, mode, fused_norm=False)  # the CPU's rms_norm is the composite one
        out[mode] = {"measured": held, "planned": cfg.model.num_layers * p.block + p.rest + p.weight_casts}
    print(json.dumps(out))
""")


def test_planned_activations_match_a_real_cpu_forward() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, r in result.items():  # float32, and bf16 autocast (its float32 residual stream, its weight casts)
        assert r["planned"] > 20e6
        assert abs(r["measured"] - r["planned"]) <= 0.08 * r["planned"], (mode, r)


def test_the_trainer_runs_the_micro_batch_auto_chose(byte_corpus, tmp_path) -> None:
    from io import StringIO

    from rich.console import Console

    from conftest import tiny_config
    from training.config import validate_config
    from training.trainer import train

    settings = dict(num_steps=1, val_data=None, batch_size=8, gradient_accumulation_steps=2)
    peaks = {b: plan(validate_config(tiny_config(byte_corpus, tmp_path, **{**settings, "batch_size": b}))).peak_bytes for b in (4, 8)}
    cfg = validate_config(tiny_config(byte_corpus, tmp_path, **settings, auto_micro_batch=True,
                                      memory_budget_gb=(peaks[4] + peaks[8]) / 2e9))
    out = StringIO()
    assert train(cfg, console=Console(file=out, width=300)).exit_code == 0
    log = out.getvalue()
    assert "auto_micro_batch: micro-batch 4 x 4 accumulation" in log and "planned peak" in log
    assert "global batch: 4 x 4 accumulation x 1 ranks = 16 sequences" in log


def test_dry_run_shows_the_micro_batch_auto_would_choose() -> None:
    """`train --dry-run` prints the choice the run will make (before a pod is paid for), and with no
    budget to plan against off a GPU it stops on the line the run would stop on."""
    from typer.testing import CliRunner

    from training.cli import app

    config = str(PROJECT_ROOT / "configs" / "runpod_1b.yaml")
    peaks = {b: plan(_preset("runpod_1b", f"batch_size={b}"), 1).peak_bytes for b in (4, 8)}
    budget = (peaks[4] + peaks[8]) / 2e9
    result = CliRunner().invoke(app, [config, "batch_size=8", "gradient_accumulation_steps=2", "auto_micro_batch=true",
                                      f"memory_budget_gb={budget}", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"auto_micro_batch: micro-batch 4 x 4 accumulation (budget {budget:.1f} GB) | planned peak {peaks[4] / 1e9:.1f} GB" in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, [config, "auto_micro_batch=true", "--dry-run"])
        assert result.exit_code == 2
        assert result.output.strip().splitlines()[-1] == ("train: error: auto_micro_batch: set memory_budget_gb "
                                                         "(no GPU memory size to plan against on cpu)")

"""The GPU check: tests/gpu, runpod_1b and runpod_2b under every strategy, packed attention, save and resume.

    bash bench/gpu_check.sh                        # on one H100/H200, offline: under 8 minutes
    bash bench/gpu_check.sh --tiny --device cpu    # the same code path on a CPU, tiny model (a minute)

1. ``pytest -m gpu tests/gpu``, its whole output in ``--tests-log`` (on a CPU every test skips: that
   still checks that they import).
2. For each config and each strategy (``none``; ``ddp`` and ``fsdp`` through ``torchrun
   --nproc-per-node 1``): the trainer's own command line, at the config's micro-batch, seq_len,
   dtype and compile setting, on synthetic token shards, ``--steps`` steps with ``--accum``
   accumulation (the configs' 16 and 64 would take minutes per step). Tokens/s and MFU are the
   median of the trainer's log windows after the first (which holds compilation); peak memory is
   the trainer's ``torch.cuda.max_memory_allocated``, against ``training.memory_plan.plan`` for the
   same settings (the named baseline), with the plan's terms.
3. The first config's ``fsdp`` run (else its first) writes a step tag halfway (under FSDP a sharded
   DCP folder written in the background: training/sharded_checkpoint.py) and ends with the blocking,
   gathered ``final``; a second run resumes from the step tag (``--resume stepNNNNNNN``) and trains
   one step past the first run's last, whose loss it logs again (the difference is reported).
   Seconds to save ``final``: from the trainer's last step line to its summary table; seconds to
   resume: from the launch to the "resumed from" line (interpreter start and model build included).
   The other runs save nothing.
   Each config's shards and checkpoints are deleted before the next config starts.
4. Packed fine-tuning batches (examples of 64-1024 tokens laid end to end, ``doc_ids``) through the
   first config's model, eager: the dense (B,1,T,T) mask against flex attention when the model
   config has a flex option (else noted as absent), and plain causal attention on the same tokens as
   the ceiling; tokens/s, peak memory, and the loss and gradient differences from dense.
5. Which SDPA kernels ran: the attention ops and kernels a profiler saw in one forward and backward of
   one block at each config's shapes (causal), and in each packed-attention variant; and the loss
   kernels (chunked, liger when installed) timed at each config's shapes.

Every figure goes into one JSON (``--out``), rewritten after each part so a run cut short still
reports what it measured. ``--budget-s`` bounds the whole check: a part that would start too late is
recorded as skipped, and a run still going at the deadline is stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import types
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from training.config import ModelConfig, TrainConfig, load_config
from training.distributed import Dist, resolve_device
from training.memory_plan import plan
from training.metrics import device_peak_flops
from training.parallelize import build_model
from training.precision import resolve_precision
from training.presets import PROJECT_ROOT
from training.token_shards import write_token_shard

RESULTS = PROJECT_ROOT / "bench" / "results" / "gpu_check.json"
STRATEGIES = ("none", "ddp", "fsdp")
# --tiny: a ~0.1M-parameter model of the same architecture, for checking this script on a CPU.
TINY = {"seq_len": 64, "batch_size": 4, "compile_model": False, "num_workers": 0,
        "model": {"vocab_size": 512, "d_model": 64, "num_layers": 2, "max_seq_len": 64, "attention": {"n_heads": 4},
                  "ffn": {"hidden_size": 128}}}
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math",
            "flex": "flex_attention"}


class Clock:
    """The check's deadline: what is left of ``--budget-s``."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


class Report:
    """The one JSON, rewritten (atomically) after every part."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def run_gpu_tests(log: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu`` with its whole output written to ``log``."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rA", "-p", "no:cacheprovider", "--timeout", "240"]
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(timeout_s, 1))
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), 124
        output += f"\ngpu_check: pytest stopped after {timeout_s:.0f} s (its share of --budget-s)\n"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{output}")
    lines = [line for line in output.splitlines() if line.strip()]
    return {"returncode": rc, "seconds": time.monotonic() - t0, "summary": lines[-1] if lines else "", "log": str(log)}


def run_lines(cmd: list[str], env: dict[str, str], cwd: Path, label: str, echo: bool, deadline_s: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd``, keeping (seconds since launch, line) for each line of its output; stopped (its whole
    process group) when ``deadline_s`` runs out."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timer = threading.Timer(max(deadline_s, 1), lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
            if echo:
                print(f"[{label}] {line}", end="", flush=True)
        return proc.wait(), lines
    finally:
        timer.cancel()


def first(lines: list[tuple[float, str]], predicate) -> float | None:
    return next((t for t, line in lines if predicate(line)), None)


def last(lines: list[tuple[float, str]], predicate) -> float | None:
    return next((t for t, line in reversed(lines) if predicate(line)), None)


def run_config(cfg: TrainConfig, raw: dict[str, Any], strategy: str, run_dir: Path, args: argparse.Namespace,
               clock: Clock, resume: str | None = None) -> tuple[dict[str, Any], list[tuple[float, str]]]:
    """One trainer run through its command line (torchrun for ddp and fsdp), from the tag ``resume`` if
    given; returns its row and console lines."""
    path = run_dir / ("resume.yaml" if resume else "run.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    launcher = [sys.executable] if strategy == "none" else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                            "--nproc-per-node", "1"]
    cmd = [*launcher, "-m", "training", str(path), *(["--resume", resume] if resume else [])]
    t0 = time.monotonic()
    rc, lines = run_lines(cmd, os.environ.copy(), run_dir, f"{run_dir.parent.name} {strategy}", not args.quiet, clock.left())
    seconds = time.monotonic() - t0
    row: dict[str, Any] = {"strategy": strategy, "world": 1, "returncode": rc, "seconds": seconds}
    if rc != 0:
        row["error"] = "\n".join(line for _, line in lines[-25:])
        if clock.left() <= 1:
            row["stopped"] = "--budget-s ran out"
        return row, lines
    metrics = [json.loads(line) for line in (Path(cfg.checkpoint_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in metrics if "tokens_per_s" in r]
    measured = windows[1:] or windows  # the first window holds compilation
    mfus = [r["mfu"] for r in measured if r.get("mfu") is not None]
    planned = plan(cfg, 1, strategy)
    peak_gb = windows[-1]["peak_mem_gb"] if windows else None
    on_gpu = args.device.startswith("cuda")
    row.update({"steps": windows[-1]["step"] if windows else 0, "loss": windows[-1]["loss"] if windows else None,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured) if measured else None,
                "mfu": statistics.median(mfus) if mfus else None, "mfu_convention": "6N + 6*L*d*T (causal attention)",
                "peak_mem_gb": peak_gb, "peak_source": "cuda.max_memory_allocated" if on_gpu else "process RSS",
                "planned_gb": planned.peak_bytes / 1e9, "plan_terms_gb": {k: v / 1e9 for k, v in {**planned.terms, **planned.transients}.items()},
                "peak_vs_plan": peak_gb / (planned.peak_bytes / 1e9) if on_gpu and peak_gb else None,
                "compile": next((r["compile"] for r in metrics if "compile" in r), None)})
    return row, lines


def run_overrides(base: dict[str, Any], args: argparse.Namespace, run_dir: Path, data_dir: Path, strategy: str, steps: int,
                  save: bool) -> dict[str, Any]:
    raw = {**base, **(TINY if args.tiny else {})}
    if args.tiny:
        raw["model"] = {**base["model"], **TINY["model"]}
    raw.pop("save_every_minutes", None)
    raw.pop("val_data", None)
    return {**raw, "device": args.device, "num_steps": steps, "gradient_accumulation_steps": args.accum,
            "log_every": args.log_every, "eval_every": 10**9, "save_every": 10**9, "save_final": save,
            "train_data": str(data_dir), "checkpoint_dir": str(run_dir / "ckpt"), "tensorboard_dir": str(run_dir / "tb"),
            "distributed": {**raw.get("distributed", {}), "strategy": strategy}}


def write_shards(cfg: TrainConfig, steps: int, accum: int, data_dir: Path) -> None:
    vocab = cfg.model.vocab_size
    tokens = (steps + 3) * accum * cfg.batch_size * (cfg.seq_len + 1) + 1
    write_token_shard(data_dir / "shard_00000.tok", np.random.default_rng(0).integers(0, vocab - 1, tokens), vocab, vocab - 1)


# ---- attention: which kernels ran, and packed batches with a dense mask against flex ----

def literal_option(value: str, model_cls: type[BaseModel], prefix: str = "") -> tuple[str, Any] | None:
    """(dotted key, its first other value) of a config option that offers ``value`` (``flex`` attention:
    ``model.attention.impl``), or None when this checkout has no such option."""
    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        for option in options:
            if get_origin(option) is Literal and value in get_args(option):
                others = [v for v in get_args(option) if v not in (value, "auto")]
                return f"{prefix}{name}", others[0] if others else None
            if isinstance(option, type) and issubclass(option, BaseModel):
                found = literal_option(value, option, f"{prefix}{name}.")
                if found:
                    return found
    return None


def with_option(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the config dict ``raw`` with ``dotted`` set to ``value``."""
    out = json.loads(json.dumps(raw))
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def attention_ops(prof: Any) -> dict[str, Any]:
    """The SDPA backends (by aten op) and the attention kernels a profiler saw."""
    names = {e.key for e in prof.key_averages()}
    backends = sorted({kind for kind, op in SDPA_OPS.items() for n in names if op in n})
    kernels = sorted(n for n in names if not n.startswith("aten::") and any(s in n.lower() for s in ("flash", "fmha", "attention", "cudnn", "flex")))
    return {"backends": backends, "kernels": kernels[:12]}


def profiled(device: torch.device, fn) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return attention_ops(prof)


def block_kernels(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Attention backends in one forward and backward of one block at the config's micro-batch and seq_len (causal)."""
    from training.model import Block, rope_tables

    precision = resolve_precision(cfg.dtype, True, device, fsdp=False)
    block = Block(cfg.model).to(device)
    x = torch.randn(cfg.batch_size, cfg.seq_len, cfg.model.d_model, device=device, requires_grad=True)
    cos, sin = rope_tables(cfg.model.head_dim, cfg.seq_len, cfg.model.positional.theta, device)

    def step() -> None:
        with precision.autocast():
            out = block(x, (cos, sin))
        out.float().sum().backward()

    step()  # warm-up: kernel selection and lazy initialisation outside the trace
    result = profiled(device, step)
    del block, x
    release(device)
    return result


def loss_kernels(cfg: TrainConfig, device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """The training loss at the config's (micro-batch x seq_len, d_model) x vocabulary, bf16: milliseconds
    per forward and backward of the chunked kernel and of liger's (``loss_kernel``), when installed."""
    from training import loss as loss_module

    rows, dim, vocab = cfg.batch_size * cfg.seq_len, cfg.model.d_model, cfg.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, dim, device=device, generator=gen).bfloat16()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * 0.02).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    out: dict[str, Any] = {"rows": rows, "dim": dim, "vocab": vocab}
    kernels = {"chunked": False, **({"liger": True} if loss_module._liger is not None and device.type == "cuda" else {})}
    for name, use_liger in kernels.items():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def step() -> None:
            loss_module.linear_cross_entropy(h, w, targets, use_liger=use_liger).backward()

        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - t0) / repeats
    if "liger" not in kernels:
        out["liger"] = "not installed" if loss_module._liger is None else "CUDA only"
    del hidden, weight
    release(device)
    return out


def packed_batch(cfg: TrainConfig, gen: np.random.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Rows of examples of 64-1024 tokens laid end to end; the first token of each example's target is masked."""
    B, T, V = cfg.batch_size, cfg.seq_len, cfg.model.vocab_size
    doc_ids = np.zeros((B, T), dtype=np.int64)
    targets = gen.integers(0, V, (B, T))
    for row in range(B):
        pos, doc = 0, 0
        while pos < T:
            n = int(gen.integers(min(64, T), min(1024, T) + 1))
            doc_ids[row, pos:pos + n] = doc
            targets[row, pos] = -100
            pos, doc = pos + n, doc + 1
    x = torch.from_numpy(gen.integers(0, V, (B, T))).to(device)
    return x, torch.from_numpy(targets).to(device), torch.from_numpy(doc_ids).to(device)


def packed_attention(cfg: TrainConfig, device: torch.device, repeats: int) -> dict[str, Any]:
    """Packed batches through the config's model (eager blocks): dense mask, flex (if offered), plain causal."""
    option = literal_option("flex", ModelConfig)
    variants: list[tuple[str, dict[str, Any], bool]] = []
    model_raw = cfg.model.model_dump(mode="json", exclude_unset=True)
    if option is None:
        variants.append(("dense", model_raw, True))
    else:
        variants.append(("dense", with_option(model_raw, option[0], option[1]), True))
        if device.type == "cuda":  # FlexAttention has no backward on the CPU
            variants.append(("flex", with_option(model_raw, option[0], "flex"), True))
    variants.append(("causal", model_raw, False))
    gen = np.random.default_rng(0)
    batches = [packed_batch(cfg, gen, device) for _ in range(repeats + 1)]
    doc_pairs = sum(int(((d[:, :, None] == d[:, None, :]).sum().item() + d.shape[1]) // 2) for d in (batches[0][2],))
    causal_pairs = batches[0][2].shape[0] * cfg.seq_len * (cfg.seq_len + 1) // 2
    out: dict[str, Any] = {"flex_option": option[0] if option else None, "micro_batch": cfg.batch_size, "seq_len": cfg.seq_len,
                           "example_tokens": "64-1024", "in_document_share_of_causal_pairs": doc_pairs / causal_pairs,
                           "blocks": "eager (not compiled)", "variants": {}}
    if option is None:
        out["note"] = "the model config has no flex attention option: dense and causal only"
    elif device.type != "cuda":
        out["note"] = "flex: CUDA only (FlexAttention has no backward on the CPU): dense and causal only"
    reference: dict[str, torch.Tensor] = {}
    precision = resolve_precision(cfg.dtype, True, device, fsdp=False)
    for name, model_cfg, packed in variants:
        run_cfg = cfg.model_copy(update={"model": ModelConfig.model_validate(model_cfg), "compile_model": False,
                                         "activation_checkpointing": False})
        torch.manual_seed(0)
        model, _ = build_model(run_cfg, Dist(0, 0, 1, "none", device), None)
        model.train()

        def step(batch) -> torch.Tensor:
            x, y, doc_ids = batch
            with precision.autocast():
                _, loss = model(x, y, doc_ids=doc_ids) if packed else model(x, y)
            loss.backward()
            return loss.detach()

        try:
            loss = step(batches[0])  # warm-up (and the compared loss and gradients)
            grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters()
                     if k in ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight")}
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for batch in batches[1:]:
                step(batch)
                model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"tokens_per_s": repeats * cfg.batch_size * cfg.seq_len / seconds, "loss": float(loss),
                                   "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
            row["attention"] = profiled(device, lambda: (step(batches[1]), model.zero_grad(set_to_none=True)))
            if name == "dense":
                reference = {"loss": loss.float(), **grads}
            elif name == "flex":
                row["loss_abs_diff_vs_dense"] = float((loss.float() - reference["loss"]).abs())
                row["grad_rel_diff_vs_dense"] = {k: float((g - reference[k]).norm() / reference[k].norm().clamp_min(1e-30))
                                                 for k, g in grads.items()}
        except Exception as exc:  # a variant that fails is reported, the others still run
            row = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        out["variants"][name] = row
        del model
        release(device)
    return out


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the check ----

def check_config(name: str, args: argparse.Namespace, work: Path, device: torch.device, clock: Clock, report: Report,
                 first_config: bool) -> None:
    base = load_config(PROJECT_ROOT / "configs" / f"{name}.yaml").model_dump(mode="json", exclude_unset=True)
    entry: dict[str, Any] = {"config": name, "runs": []}
    report.data["configs"].append(entry)
    data_dir = work / name / "data"
    saver = "fsdp" if "fsdp" in args.strategies else args.strategies[0]
    for strategy in args.strategies:
        run_dir = work / name / strategy
        run_dir.mkdir(parents=True, exist_ok=True)
        save = first_config and strategy == saver
        raw = run_overrides(base, args, run_dir, data_dir, strategy, args.steps, save)
        if save:  # a step tag halfway (sharded and asynchronous under FSDP), then the gathered `final`
            raw["save_every"] = max(1, args.steps // 2)
        cfg = TrainConfig.model_validate(raw)
        entry.update({"params": plan(cfg, 1, "none").params, "micro_batch": cfg.batch_size, "seq_len": cfg.seq_len,
                      "accum": cfg.gradient_accumulation_steps, "dtype": cfg.dtype, "compile": cfg.compile_model})
        if not data_dir.exists():
            write_shards(cfg, args.steps + 1, args.accum, data_dir)
        if clock.left() < args.min_run_s:
            entry["runs"].append({"strategy": strategy, "skipped": f"--budget-s: {clock.left():.0f} s left"})
            continue
        row, lines = run_config(cfg, raw, strategy, run_dir, args, clock)
        entry["runs"].append(row)
        report.write()
        if save and row["returncode"] == 0:
            report.data["checkpoint"] = save_and_resume(cfg, raw, row, lines, strategy, run_dir, args, clock)
        shutil.rmtree(run_dir, ignore_errors=True)  # this run's checkpoints, before the next run
        report.write()
    if clock.left() >= args.min_run_s:
        cfg = TrainConfig.model_validate(run_overrides(base, args, work, data_dir, "none", args.steps, False))
        entry["sdpa_causal_block"] = block_kernels(cfg, device)
        entry["loss_kernels"] = loss_kernels(cfg, device)
        if first_config:
            report.data["packed_attention"] = {"config": name, **packed_attention(cfg, device, args.packed_repeats)}
    shutil.rmtree(work / name, ignore_errors=True)  # the config's shards and checkpoints, before the next config
    report.write()


def save_and_resume(cfg: TrainConfig, raw: dict[str, Any], row: dict[str, Any], lines: list[tuple[float, str]], strategy: str,
                    run_dir: Path, args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """The save run's checkpoints, then a run that resumes from its halfway step tag (sharded under
    FSDP: training/sharded_checkpoint.py) and trains one step past the first run's last."""
    ckpt_dir, half = Path(cfg.checkpoint_dir), max(1, args.steps // 2)
    step_line = last(lines, lambda line: line.startswith(f"step {args.steps}/"))
    summary = first(lines, lambda line: "training summary" in line)
    tag = next(iter(sorted(p.name for p in ckpt_dir.glob(f"step{half:07d}*"))), None)
    size = lambda paths: sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 1e9  # noqa: E731
    ck: dict[str, Any] = {"config": run_dir.parent.name, "strategy": strategy, "step_tag": tag,
                          "step_tag_gb": size(ckpt_dir.glob(f"step{half:07d}*")), "final_gb": size(ckpt_dir.glob("final*")),
                          "final_save_s": summary - step_line if summary and step_line else None, "loss_at_last_step": row["loss"]}
    if clock.left() < args.min_run_s:
        return {**ck, "resume": f"skipped: --budget-s, {clock.left():.0f} s left"}
    again = {**raw, "num_steps": args.steps + 1, "save_final": False, "save_every": 10**9}
    resumed, rlines = run_config(TrainConfig.model_validate(again), again, strategy, run_dir, args, clock,
                                 resume=f"step{half:07d}")
    relogged = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    again_loss = next((r["loss"] for r in reversed(relogged) if r.get("step") == args.steps and "loss" in r), None)
    return {**ck, "resume_returncode": resumed["returncode"], "resume_s": first(rlines, lambda l: l.startswith("resumed from")),
            "resumed_step": next((int(l.split("at step ")[1].split()[0]) for _, l in rlines if l.startswith("resumed from")), None),
            "trained_to": resumed.get("steps"), "seconds": resumed["seconds"], "error": resumed.get("error"),
            "loss_at_last_step_resumed": again_loss,
            "loss_diff": abs(again_loss - row["loss"]) if again_loss is not None and row["loss"] is not None else None}


def failures(report: dict[str, Any]) -> list[str]:
    found = []
    tests = report.get("gpu_tests", {})
    if tests.get("returncode", 0) not in (0, 5):  # 5: every test deselected
        found.append(f"tests/gpu: {tests.get('summary')}")
    for entry in report["configs"]:
        found += [f"{entry['config']} {r['strategy']}: exit {r['returncode']}" for r in entry["runs"]
                  if r.get("returncode", 0) != 0 and "stopped" not in r]
    ck = report.get("checkpoint")
    if ck and ck.get("resume_returncode", 0) != 0:
        found.append(f"resume of {ck['config']}: exit {ck['resume_returncode']}")
    for name, row in report.get("packed_attention", {}).get("variants", {}).items():
        if "error" in row:
            found.append(f"packed attention {name}: {row['error'][:200]}")
    return found


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"GPU check on {report['device']} (torch {report['torch']}): {report['steps']} steps x {report['accum']} accumulation"
                        + (", tiny model" if report["tiny"] else ""))
    for col in ("config", "strategy", "params", "B x T", "tokens/s", "MFU", "peak GB", "plan GB", "peak/plan", "run s"):
        table.add_column(col, justify="right")
    for entry in report["configs"]:
        for r in entry["runs"]:
            if "skipped" in r or r.get("returncode"):
                table.add_row(entry["config"], r["strategy"], "", "", r.get("skipped", f"exit {r.get('returncode')}"), *[""] * 5)
                continue
            table.add_row(entry["config"], r["strategy"], f"{entry['params'] / 1e6:,.1f}M", f"{entry['micro_batch']}x{entry['seq_len']}",
                          _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["mfu"], ".1%"), _fmt(r["peak_mem_gb"], ".2f"),
                          f"{r['planned_gb']:.2f}", _fmt(r["peak_vs_plan"], ".2f"), f"{r['seconds']:.0f}")
    console.print(table)
    if ck := report.get("checkpoint"):
        console.print(f"checkpoints ({ck['config']} {ck['strategy']}): {ck['step_tag']} {ck['step_tag_gb']:.1f} GB, final {ck['final_gb']:.1f} GB "
                      f"saved in {_fmt(ck['final_save_s'], '.1f')} s | resume from step {ck.get('resumed_step')}: "
                      f"{_fmt(ck.get('resume_s'), '.1f')} s, trained to {ck.get('trained_to')}, loss at step "
                      f"{report['steps']} again within {_fmt(ck.get('loss_diff'), '.2e')}")
    if packed := report.get("packed_attention"):
        parts = [f"{k} {_fmt(v.get('tokens_per_s'), ',.0f')} tok/s {v.get('attention', {}).get('backends', v.get('error', ''))}"
                 for k, v in packed["variants"].items()]
        console.print(f"packed attention ({packed['config']}): " + " | ".join(parts))
    tests = report.get("gpu_tests", {})
    console.print(f"tests/gpu: {tests.get('summary', tests.get('skipped'))} | total {report['total_seconds'] / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["runpod_1b", "runpod_2b"])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation (the configs' own would take minutes per step)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per throughput window")
    parser.add_argument("--packed-repeats", type=int, default=3, help="timed packed-attention steps per variant")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture: check this script on a CPU")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu tests/gpu first")
    parser.add_argument("--tests-budget-s", type=float, default=180.0, help="the most tests/gpu may take")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole check; later parts are skipped, a late run stopped")
    parser.add_argument("--min-run-s", type=float, default=30.0, help="a run does not start with less of the budget left")
    parser.add_argument("--workdir", help="where shards and checkpoints go (default: a temporary directory, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tests-log", type=Path, help="pytest's whole output (default: next to --out)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the trainer's lines")
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    device = resolve_device(args.device, 0)
    console = Console(highlight=False, width=160)
    report = Report(args.out, {
        "bench": "gpu_check", "command": " ".join(["bash bench/gpu_check.sh", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_flops": device_peak_flops(device), "torch": torch.__version__, "python": platform.python_version(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "tiny": args.tiny, "steps": args.steps, "accum": args.accum,
        "baseline": "training.memory_plan.plan (peak) and the published dense bf16 peak (MFU)", "configs": []})
    if args.skip_tests:
        report.data["gpu_tests"] = {"skipped": "--skip-tests"}
    else:
        log = args.tests_log or args.out.with_name("pytest_gpu.txt")
        report.data["gpu_tests"] = run_gpu_tests(log, min(args.tests_budget_s, clock.left() - args.min_run_s))
    report.write()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for i, name in enumerate(args.configs):
            check_config(name, args, Path(tmp), device, clock, report, first_config=i == 0)
    report.data["total_seconds"] = clock.elapsed()
    problems = failures(report.data)
    report.data["failures"] = problems
    report.write()
    print_summary(report.data, console)
    console.print(f"wrote {args.out}")
    if problems:
        console.print("gpu_check: " + "; ".join(problems))
        raise SystemExit(1)


if __name__ == "__main__":
    main()

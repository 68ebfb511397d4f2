"""The training loop: one function, :func:`train`, and the step it repeats, :func:`train_step`.

Everything else (config, model, data, precision, parallelism, checkpoints, metrics) lives in its own
module; this file wires them together so a reader sees the whole run in one place.

Stops are cooperative. SIGTERM (RunPod's warning before SIGKILL) or SIGINT sets a flag; the current
optimizer step finishes, all ranks agree to stop at the same step, a checkpoint is written if the
last measured save time fits in ``preemption_grace_s``, and the process exits with 143 (SIGTERM) or
130 (SIGINT). ``--resume auto`` then continues on the same loss curve.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from training import checkpoint as ckpt
from training.atomic import remove_stale_temporaries
from training.config import TrainConfig
from training.data import BatchLoader, Prefetcher, TokenStream, iter_eval_batches, resolve_shards
from training.distributed import Dist, setup
from training.metrics import RunLog, device_peak_flops, mfu, trim_metrics
from training.model import build_meta_model, count_parameters, flops_per_token
from training import moe
from training.parallelize import build_model
from training.optim import build_optimizer, build_scheduler
from training.precision import Precision, resolve_precision

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass
class TrainResult:
    exit_code: int
    step: int
    tokens_seen: int
    seconds: float
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    best_val_loss: float = math.inf
    checkpoint_dir: str = ""


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between optimizer steps (a second SIGINT aborts now)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum, self.received_at = signum, time.monotonic()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no signal handling
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_step(model: torch.nn.Module, batches: Prefetcher, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               precision: Precision, dist: Dist, accum: int, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``accum`` micro-batches; returns (mean loss, grad norm), unsynchronised.

    The caller decides whether the step is applied (a non-finite loss or norm skips it).
    """
    device = dist.device
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = batches.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with dist.grad_sync(model, enabled=micro == accum - 1), precision.autocast():
            _, loss = model(x, y)
            loss = loss / accum
        scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return dist.all_reduce_mean(total), norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, cfg: TrainConfig, dist: Dist, precision: Precision) -> float:
    model.eval()
    losses = []
    for x, y in iter_eval_batches(stream, cfg.batch_size, cfg.seq_len, cfg.eval_steps, dist.rank, dist.world_size):
        with precision.autocast():
            _, loss = model(x.to(dist.device), y.to(dist.device))
        losses.append(loss.float())
    model.train()
    return float(dist.all_reduce_mean(torch.stack(losses).mean()))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: TrainConfig, *, config_path: str | Path | None = None, resume: str | None = None,
          console: Console | None = None) -> TrainResult:
    """Train ``cfg`` to ``num_steps`` (or until stopped); returns what happened, never sys.exits."""
    start_time = time.monotonic()
    dist = setup(cfg.distributed, cfg.device)
    explicit_dtype = "dtype" in cfg.model_fields_set
    precision = resolve_precision(cfg.dtype, explicit_dtype, dist.device, fsdp=dist.strategy == "fsdp")
    wandb_cfg = {"project": cfg.wandb_project, "name": cfg.wandb_run_name, "config": cfg.to_plain()} if cfg.use_wandb else None
    log = RunLog(dist.is_main, cfg.resolved_tensorboard_dir, wandb_cfg, console)
    ckpt_dir = Path(cfg.checkpoint_dir)

    _seed_everything(cfg.seed)
    model, net = build_model(cfg, dist, precision.fsdp_param_dtype)
    num_params = count_parameters(build_meta_model(cfg.model))
    optimizer = build_optimizer(net, cfg.optimizer, dist.device.type)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.schedule_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.use_scaler)
    loader = BatchLoader(TokenStream(resolve_shards(cfg.train_data), cfg.seed, cfg.model.vocab_size),
                         cfg.batch_size, cfg.seq_len, dist.rank, dist.world_size)
    val_stream = None
    if cfg.val_data:
        val_stream = TokenStream(resolve_shards(cfg.val_data, "val_data"), cfg.seed, cfg.model.vocab_size, key="val_data")

    step, tokens_seen, best_val = 0, 0, math.inf
    if dist.is_main and ckpt_dir.is_dir():
        remove_stale_temporaries(ckpt_dir)  # a killed writer's .tmp-* files; only the writing rank may touch them
    loaded = ckpt.resolve_resume(resume, ckpt_dir, log.warn) if resume else None
    if loaded is not None:
        dist.load_model_state(net, loaded.weights, cfg.model.tie_embeddings)
        dist.load_optimizer_state(net, optimizer, loaded.state["optimizer"])
        scheduler.load_state_dict(loaded.state["scheduler"])
        scaler.load_state_dict(loaded.state["scaler"])
        loader.load_state_dict(loaded.state["loader"])
        step, tokens_seen, best_val = loaded.step, int(loaded.state["tokens_seen"]), float(loaded.state["best_val_loss"])
        rngs = loaded.state["rng"]
        if len(rngs) == dist.world_size:
            ckpt.set_rng_state(rngs[dist.rank])
        else:
            log.warn(f"world size changed ({len(rngs)} -> {dist.world_size}): RNG streams re-seeded from seed and step")
            _seed_everything(cfg.seed + 1000003 * step + dist.rank)
        log.info(f"resumed from {ckpt_dir / loaded.tag} at step {step}")
        if dist.is_main and (dropped := trim_metrics(ckpt_dir / "metrics.jsonl", step)):
            log.info(f"metrics.jsonl: dropped {dropped} rows logged after step {step} by the interrupted run")
        del loaded
    else:
        if resume == "auto":
            log.info(f"no checkpoint in {ckpt_dir}: starting fresh")
        torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout streams; init above was identical
        if cfg.active_expert is not None:
            moe.load_expert_run_start(net, cfg, dist, log.info)
        if dist.is_main:
            ckpt.copy_original_config(config_path, ckpt_dir)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps * dist.world_size
    fpt = flops_per_token(cfg.model, cfg.seq_len, num_params)
    peak = device_peak_flops(dist.device)
    log.info(f"model: {moe.describe_parameters(cfg.model, num_params)} | device {dist.device} x{dist.world_size} ({dist.strategy}) | {precision.reason}")
    log.info(f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {dist.world_size} ranks "
             f"= {cfg.batch_size * cfg.gradient_accumulation_steps * dist.world_size} sequences = {tokens_per_step:,} tokens/step")

    def after_write(snap: ckpt.Snapshot) -> None:
        if snap.tag.startswith("step"):
            ckpt.prune(ckpt_dir, cfg.keep_last_n, protect={snap.tag})

    writer = ckpt.AsyncCheckpointer(ckpt_dir, after_write)
    save_cost: float | None = None
    last_save = time.monotonic()
    metrics_path = ckpt_dir / "metrics.jsonl"

    def save(tag: str, block: bool = False) -> None:
        nonlocal save_cost, last_save
        t0 = time.monotonic()
        state = {
            "optimizer": dist.optimizer_state(net, optimizer),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "loader": batches.state_dict(),
            "rng": dist.gather_objects(ckpt.rng_state()),
            "tokens_seen": tokens_seen,
            "best_val_loss": best_val,
            "world_size": dist.world_size,
        }
        weights = dist.model_state(net, cfg.model.tie_embeddings)
        if dist.is_main:
            writer.save(ckpt.capture(tag, step, weights, state, cfg.to_plain()), block=block)
        save_cost = time.monotonic() - t0 + writer.last_seconds
        last_save = time.monotonic()

    def record(values: dict[str, Any]) -> None:
        log.scalars(step, {k: v for k, v in values.items() if k != "step"})
        if dist.is_main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    stop = StopFlag()
    stop.install()
    batches = Prefetcher(loader, cfg.num_workers)
    result = TrainResult(EXIT_OK, step, tokens_seen, 0.0, best_val_loss=best_val, checkpoint_dir=str(ckpt_dir))
    bad_steps = 0
    window_start, window_tokens = time.perf_counter(), 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    net.train()
    try:
        if step >= cfg.num_steps:
            log.info(f"already at step {step} of {cfg.num_steps}: nothing to train")
        elif step == 0 and val_stream is not None:  # where the validation curve starts
            val = result.val_losses[0] = evaluate(net, val_stream, cfg, dist, precision)
            log.info(f"step 0 | val loss {val:.4f} (untrained)")
            record({"val_loss": val})
        while step < cfg.num_steps:
            loss, norm = train_step(net, batches, optimizer, scaler, precision, dist, cfg.gradient_accumulation_steps, cfg.optimizer.grad_clip)
            finite = bool(torch.isfinite(loss)) and (precision.use_scaler or bool(torch.isfinite(norm)))
            if finite:
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, bad_steps = step + 1, 0
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
            else:
                scaler.update()
                bad_steps += 1
                log.warn(f"non-finite loss at step {step + 1} ({bad_steps}/{cfg.max_bad_steps} in a row): step skipped")
            optimizer.zero_grad(set_to_none=True)
            writer.poll()
            if bad_steps >= cfg.max_bad_steps:
                save(ckpt.step_tag(step), block=True)
                log.info(f"stopping: {bad_steps} non-finite losses in a row; last good weights saved as {ckpt.step_tag(step)} "
                         f"(lower optimizer.lr or check the data, then --resume auto)")
                result.exit_code = EXIT_NONFINITE
                break
            if finite and (step % cfg.log_every == 0 or step == cfg.num_steps):
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed if elapsed > 0 else 0.0
                util = mfu(tps, fpt, peak, dist.world_size)
                loss_v, lr = float(loss), scheduler.get_last_lr()[0]
                eta = (cfg.num_steps - step) * tokens_per_step / tps if tps else 0.0
                log.info(f"step {step}/{cfg.num_steps} | loss {loss_v:.4f} | lr {lr:.2e} | gnorm {float(norm):.3f} | "
                         f"{tps:,.0f} tok/s" + (f" | mfu {util:.1%}" if util is not None else "") +
                         f" | mem {_peak_memory_gb(dist.device):.2f}GB | {1000 * elapsed / max(1, window_tokens // tokens_per_step):.0f}ms/step | eta {_fmt_duration(eta)}")
                record({"loss": loss_v, "lr": lr, "grad_norm": float(norm), "tokens_per_s": tps, "mfu": util,
                        "peak_mem_gb": _peak_memory_gb(dist.device), "tokens_seen": tokens_seen, **moe.collect_stats(model)})
                result.losses[step] = loss_v
                window_start, window_tokens = time.perf_counter(), 0
            if finite and val_stream is not None and (step % cfg.eval_every == 0 or step == cfg.num_steps):
                val = evaluate(net, val_stream, cfg, dist, precision)
                result.val_losses[step] = val
                log.info(f"step {step} | val loss {val:.4f}" + (" (best)" if val < best_val else ""))
                record({"val_loss": val})
                if val < best_val:
                    best_val = val
                    save("best")
            timed = cfg.save_every_minutes is not None and time.monotonic() - last_save > 60 * cfg.save_every_minutes
            stopping, timed = dist.any_flag(stop.signum is not None, timed and dist.is_main)
            if stopping:
                waited = time.monotonic() - stop.received_at if stop.signum is not None else 0.0
                fits = save_cost is None or waited + 1.25 * save_cost < cfg.preemption_grace_s
                (fits,) = dist.any_flag(fits and dist.is_main)
                if fits:
                    save(ckpt.step_tag(step), block=True)
                    log.info(f"stopped by signal at step {step}: checkpoint {ckpt.step_tag(step)} written; resume with --resume auto")
                else:
                    log.warn(f"stopped by signal at step {step}: a save (~{save_cost:.0f}s) does not fit the "
                             f"{cfg.preemption_grace_s:.0f}s grace period; the newest periodic checkpoint is the resume point")
                result.exit_code = EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
                break
            if finite and step < cfg.num_steps and (step % cfg.save_every == 0 or timed):
                save(ckpt.step_tag(step))
        else:
            save("final", block=True)
            if cfg.active_expert is not None:
                moe.finish_expert_run(net, cfg, dist, log.info)
        writer.wait()
    finally:
        batches.close()
        stop.restore()
        log.close()
    result.step, result.tokens_seen, result.best_val_loss = step, tokens_seen, best_val
    result.seconds = time.monotonic() - start_time
    if dist.is_main:
        _summary(log.console, cfg, result, num_params)
    dist.shutdown()
    return result


def _summary(console: Console, cfg: TrainConfig, r: TrainResult, num_params: int) -> None:
    table = Table(title="training summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    last_loss = r.losses[max(r.losses)] if r.losses else float("nan")
    rows = [
        ("parameters", f"{num_params / 1e6:.2f}M"),
        ("steps", f"{r.step} / {cfg.num_steps}"),
        ("tokens seen", f"{r.tokens_seen:,}"),
        ("wall time", _fmt_duration(r.seconds)),
        ("last train loss", f"{last_loss:.4f}"),
        ("best val loss", f"{r.best_val_loss:.4f}" if math.isfinite(r.best_val_loss) else "-"),
        ("checkpoints", r.checkpoint_dir),
        ("tensorboard", str(cfg.resolved_tensorboard_dir)),
        ("exit code", str(r.exit_code)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)

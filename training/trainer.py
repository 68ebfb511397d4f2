"""The training loop: one function, :func:`train`, and the step it repeats, :func:`train_step`.

Everything else (config, model, parallelism, data, precision, checkpoints, preemption, metrics) lives
in its own module; this file wires them together so a reader sees the whole run in one place.

Stops are cooperative. SIGTERM (RunPod's warning before SIGKILL) or SIGINT sets a flag, read between
micro-batches (``training/preemption.py``); all ranks stop at the same point, a step cut short is
abandoned, a checkpoint of the last completed step is written if the last measured save time fits
in ``preemption_grace_s``, and the process exits with 143 (SIGTERM) or 130 (SIGINT). ``--resume
auto`` then continues on the same loss curve.
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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from training import checkpoint as ckpt
from training import init
from training.checkpointer import Checkpointer
from training.config import TrainConfig
from training.data import Prefetcher, TokenStream
from training.distributed import Dist, setup
from training.evaluate import mean_loss, perplexity
from training.heartbeat import Heartbeat
from training.id_scan import IdScan
from training.inputs import pretrain_loaders
from training.loss import IGNORE_INDEX
from training.metrics import RunLog, compile_report, device_peak_flops, mfu, system_telemetry, trim_metrics
from training.model import build_meta_model, count_parameters, flops_per_token
from training import moe
from training.optim import build_optimizer, build_scheduler
from training.parallelize import build_model
from training.precision import Precision, resolve_precision
from training.preemption import MicroStepAgreement, StopFlag

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
DATA_WAIT_SHOWN = 0.05  # the log line names the share of time spent waiting for batches from here on (metrics.jsonl always has it)


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


def train_step(model: torch.nn.Module, batches: Prefetcher, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               precision: Precision, dist: Dist, accum: int, grad_clip: float,
               agreement: MicroStepAgreement) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimizer step over ``accum`` micro-batches; returns (loss, grad norm), unsynchronised, or
    None when a stop signal cut the step short (its gradients are then partial: drop them).

    The loss is per token: the sum of the token losses of every micro-batch on every rank over their
    global count of valid (not ``-100``) targets, so a micro-batch or rank with fewer valid targets
    (masked or packed fine-tuning) weighs less, not the same (the accumulation bug transformers fixed
    in 2024). The counts are summed in one all-reduce before the first backward; each micro-batch's
    mean loss is scaled by its share of the tokens, times the world size because DDP and FSDP average
    gradients over ranks. Every backward runs inside ``grad_sync`` (``Dist.grad_sync``), where the
    gradient reduction happens. The caller decides whether the step is applied (a non-finite loss or
    norm skips it: also when no target at all is valid).
    """
    device = dist.device
    micro_batches = [_batch(batches.next_batch(), device) for _ in range(accum)]
    counts = torch.stack([(y != IGNORE_INDEX).sum() for _, y, _ in micro_batches])  # int64: exact at any global batch
    total_count = dist.all_reduce_sum(counts.sum())
    scale = dist.world_size / total_count.clamp_min(1)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y, doc_ids) in enumerate(micro_batches):
        if micro and agreement.should_abandon():
            return None
        y = _finite_targets(y, counts[micro])
        with dist.grad_sync(model, enabled=micro == accum - 1):
            with precision.autocast():
                _, loss = model(x, y) if doc_ids is None else model(x, y, doc_ids=doc_ids)
            scaler.scale(loss * (counts[micro] * scale)).backward()
        loss_sum += loss.detach() * counts[micro]
    agreement.finish_step()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return dist.all_reduce_sum(loss_sum) / total_count, norm


def _finite_targets(y: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``y``, or, when every target is ignored, ``y`` with one stand-in target: the micro-batch still runs
    forward and backward (every rank's reduction hooks must fire) with a finite mean loss and weight 0,
    decided on the device (no host synchronisation)."""
    flat = y.reshape(-1).clone()
    flat[0] = torch.where(count > 0, flat[0], torch.zeros_like(flat[0]))
    return flat.view_as(y)


def _batch(batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` of pretraining or ``(x, y, doc_ids)`` of a fine-tuning stage (doc_ids None when padded), on ``device``."""
    x, y, *rest = batch
    doc_ids = rest[0] if rest else None
    return (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
            doc_ids.to(device, non_blocking=True) if doc_ids is not None else None)


def evaluate(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], dist: Dist, precision: Precision) -> float:
    """Mean validation loss over ``batches`` (the same ones every time: see ``_data``), averaged over ranks."""
    return float(dist.all_reduce_mean(mean_loss(model, batches, dist.device, precision.autocast)))


def _data(cfg: TrainConfig, dist: Dist, warn) -> tuple[Any, Callable[[], Iterator[tuple]] | None, list[TokenStream]]:
    """The training loader, the validation batches of ``cfg.stage`` and the token streams whose ids
    :class:`IdScan` checks: windows of token shards or of text tokenized on the fly for pretraining
    (training/inputs.py), chat-template examples for a fine-tuning stage (training/sft/loader.py)."""
    if not cfg.val_data and "eval_every" in cfg.model_fields_set and dist.is_main:
        warn(f"val_data: not set, so eval_every={cfg.eval_every} evaluates nothing: no validation loss, "
             f"no best checkpoint (point val_data at held-out token shards)")
    if cfg.stage != "pretrain":
        from training.sft.loader import build_sft_loaders

        return (*build_sft_loaders(cfg, dist.rank, dist.world_size, warn if dist.is_main else None), [])
    return pretrain_loaders(cfg, dist.rank, dist.world_size)


def _memory_plan(cfg: TrainConfig, dist: Dist) -> tuple[TrainConfig, str | None]:
    """With ``auto_micro_batch``, ``cfg`` with the micro-batch chosen from the memory plan (every rank
    plans alike); on a GPU, the plan's breakdown as a log line (a run that then measures more says
    which term was wrong)."""
    if not cfg.auto_micro_batch and dist.device.type != "cuda":
        return cfg, None
    from training.memory_plan import plan_line

    return plan_line(cfg, dist.world_size, dist.strategy, dist.device)


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
    cfg = init.resolve_config(cfg)  # the model (and tokenizer) of init_from's checkpoint or HF model
    if cfg.init_from == init.RESUME and resume is None:
        resume = "auto"
    dist = setup(cfg.distributed, cfg.device)
    cfg, planned = _memory_plan(cfg, dist)
    explicit_dtype = "dtype" in cfg.model_fields_set
    precision = resolve_precision(cfg.dtype, explicit_dtype, dist.device, fsdp=dist.strategy == "fsdp")
    wandb_cfg = {"project": cfg.wandb_project, "name": cfg.wandb_run_name, "config": cfg.to_plain()} if cfg.use_wandb else None
    log = RunLog(dist.is_main, cfg.resolved_tensorboard_dir, wandb_cfg, console)
    if planned:
        log.info(planned)
    ckpt_dir = Path(cfg.checkpoint_dir)

    _seed_everything(cfg.seed)
    model, net = build_model(cfg, dist, precision.fsdp_param_dtype)
    num_params = count_parameters(build_meta_model(cfg.model))
    offload = cfg.optimizer.cpu_offload
    fsdp_offload = offload and dist.strategy == "fsdp"  # FSDP2's CPUOffloadPolicy: parameters and state on the host
    optimizer = build_optimizer(net, cfg.optimizer, "cpu" if fsdp_offload else dist.device.type, host_state=offload and not fsdp_offload)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.schedule_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.use_scaler)
    loader, val_batches, streams = dist.agree(lambda: _data(cfg, dist, log.warn))  # one rank's missing data fails all, said once
    checkpoints = Checkpointer(ckpt_dir, dist, cfg.to_plain(), cfg.keep_last_n, cfg.model.tie_embeddings, log.warn)

    step, tokens_seen, best_val = 0, 0, math.inf
    restored = checkpoints.restore(resume, net, optimizer) if resume else None
    if restored is not None:
        scheduler.load_state_dict(restored.state["scheduler"])
        scaler.load_state_dict(restored.state["scaler"])
        loader.load_state_dict(restored.state["loader"])
        step, tokens_seen, best_val = restored.step, int(restored.state["tokens_seen"]), float(restored.state["best_val_loss"])
        if restored.rng is not None:
            ckpt.set_rng_state(restored.rng, dist.device)
        else:
            log.warn(f"world size changed ({restored.state['world_size']} -> {dist.world_size}): RNG streams re-seeded from seed and step")
            _seed_everything(cfg.seed + 1000003 * step + dist.rank)
        log.info(f"resumed from {ckpt_dir / restored.tag} at step {step}")
        if dist.is_main and (dropped := trim_metrics(ckpt_dir / "metrics.jsonl", step)):
            log.info(f"metrics.jsonl: dropped {dropped} rows logged after step {step} by the interrupted run")
    else:
        if resume == "auto":
            log.info(f"no checkpoint in {ckpt_dir}: starting fresh")
        init.load_initial_weights(cfg, net, dist, log.info)  # before the per-rank seed: every rank loads the same
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
    metrics_path = ckpt_dir / "metrics.jsonl"

    def record(values: dict[str, Any]) -> None:
        log.scalars(step, {k: v for k, v in values.items() if k != "step" and not isinstance(v, dict)})
        if dist.is_main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    if cfg.eval_only:  # seed 001: one evaluation of the (resumed) weights, nothing trained or saved
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        val = evaluate(net, val_batches(), dist, precision)
        log.info(f"step {step} | val loss {val:.4f} | ppl {perplexity(val):.2f} (eval_only)")
        record({"val_loss": val, "val_ppl": perplexity(val)})
        log.close()
        dist.shutdown()
        return TrainResult(EXIT_OK, step, tokens_seen, time.monotonic() - start_time, val_losses={step: val},
                           best_val_loss=min(best_val, val), checkpoint_dir=str(ckpt_dir))

    stop = StopFlag()
    stop.install()
    agreement = MicroStepAgreement(dist, stop)
    batches = Prefetcher(loader, cfg.num_workers, pin=dist.device.type == "cuda")
    scan = IdScan(streams, dist.rank, dist.world_size)  # every shard's ids, dealt out over the ranks, while the first steps run
    scanned = False
    result = TrainResult(EXIT_OK, step, tokens_seen, 0.0, best_val_loss=best_val, checkpoint_dir=str(ckpt_dir))

    def state(loader_state: dict[str, int]) -> dict[str, Any]:
        return {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "loader": loader_state,
                "tokens_seen": tokens_seen, "best_val_loss": best_val, "world_size": dist.world_size}

    def save(tags: list[str], block: bool = False, boundary: tuple[dict, dict] | None = None) -> float:
        """Save and return the seconds it took (kept out of the throughput window)."""
        t0 = time.perf_counter()
        loader_state, rng = boundary or (batches.state_dict(), ckpt.rng_state(dist.device))
        checkpoints.save(tags, step, net, optimizer, state(loader_state), rng, block=block)
        return time.perf_counter() - t0

    bad_steps, first_step = 0, True
    epoch_seen = batches.state_dict().get("epoch", 0)  # save_every_epoch: a checkpoint when this grows
    heartbeat = Heartbeat("train", "steps", enabled=dist.is_main)  # boot.sh's watchdog: a step is progress
    window_start, window_tokens, window_excluded = time.perf_counter(), 0, 0.0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    net.train()
    try:
        if step >= cfg.num_steps:
            log.info(f"already at step {step} of {cfg.num_steps}: nothing to train")
        elif step == 0 and val_batches is not None:  # where the validation curve starts
            val = result.val_losses[0] = evaluate(net, val_batches(), dist, precision)
            log.info(f"step 0 | val loss {val:.4f} | ppl {perplexity(val):.2f} (untrained)")
            record({"val_loss": val, "val_ppl": perplexity(val)})
        window_start = time.perf_counter()
        while step < cfg.num_steps:
            boundary = (batches.state_dict(), ckpt.rng_state(dist.device))  # where an abandoned step resumes from
            out = train_step(net, batches, optimizer, scaler, precision, dist, cfg.gradient_accumulation_steps,
                             cfg.optimizer.grad_clip, agreement)
            if out is None:  # a stop signal cut the step short: the last completed step is the resume point
                dist.zero_grad(optimizer)
                log.info(f"step {step + 1} cut short by the stop signal: its partial gradients are dropped")
                result.exit_code = _stop(stop, dist, checkpoints, cfg, log, step, lambda: save([ckpt.step_tag(step)], True, boundary))
                break
            loss, norm = out
            finite = bool(torch.isfinite(loss)) and (precision.use_scaler or bool(torch.isfinite(norm)))
            if finite:
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, bad_steps = step + 1, 0
                heartbeat.beat(step)
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
            else:
                scaler.update()
                bad_steps += 1
                log.warn(f"non-finite loss at step {step + 1} ({bad_steps}/{cfg.max_bad_steps} in a row): step skipped")
            dist.zero_grad(optimizer)
            checkpoints.poll()
            if first_step and finite:  # compilation and warm-up: not part of the throughput window
                first_step = False
                if cfg.compile_model:
                    report = compile_report()
                    log.info("compile: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items()))
                    record({"compile": report})
                if step % cfg.log_every:
                    window_start, window_tokens, window_excluded = time.perf_counter(), 0, 0.0
                    batches.take_waited()
            if bad_steps >= cfg.max_bad_steps:
                save([ckpt.step_tag(step)], block=True)
                kept = (f"last good weights saved as {ckpt.step_tag(step)}" if checkpoints.last_saved
                        else "the weights themselves are no longer finite, so none were saved")
                log.info(f"stopping: {bad_steps} non-finite losses in a row; {kept} "
                         f"(lower optimizer.lr or check the data, then --resume auto)")
                result.exit_code = EXIT_NONFINITE
                break
            if finite and (step % cfg.log_every == 0 or step == cfg.num_steps):
                elapsed = time.perf_counter() - window_start - window_excluded
                tps = window_tokens / elapsed if elapsed > 0 else 0.0
                util = mfu(tps, fpt, peak, dist.world_size)
                loss_v, lr = float(loss), scheduler.get_last_lr()[0]
                eta = (cfg.num_steps - step) * tokens_per_step / tps if tps else 0.0
                data_wait = min(1.0, batches.take_waited() / elapsed) if elapsed > 0 else 0.0  # share of the window starved of data
                log.info(f"step {step}/{cfg.num_steps} | loss {loss_v:.4f} | lr {lr:.2e} | gnorm {float(norm):.3f} | "
                         f"{tps:,.0f} tok/s" + (f" | mfu {util:.1%}" if util is not None else "") +
                         f" | mem {_peak_memory_gb(dist.device):.2f}GB | {1000 * elapsed / max(1, window_tokens // tokens_per_step):.0f}ms/step"
                         + (f" | data wait {data_wait:.0%}" if data_wait >= DATA_WAIT_SHOWN else "") + f" | eta {_fmt_duration(eta)}")
                record({"loss": loss_v, "lr": lr, "grad_norm": float(norm), "tokens_per_s": tps, "mfu": util, "data_wait": data_wait,
                        "peak_mem_gb": _peak_memory_gb(dist.device), "tokens_seen": tokens_seen, **system_telemetry(dist.device),
                        **moe.collect_stats(model)})
                result.losses[step] = loss_v
                window_start, window_tokens, window_excluded = time.perf_counter(), 0, 0.0
            timed = cfg.save_every_minutes is not None and time.monotonic() - checkpoints.last_save > 60 * cfg.save_every_minutes
            if step == cfg.num_steps:
                scan.wait()  # a run never ends "done" on shards holding ids its model cannot embed
            epoch = batches.state_dict().get("epoch", 0)
            stopping, timed, bad_ids, epoch_end, unscanned = dist.any_flag(
                stop.raised, timed and dist.is_main, scan.failed, cfg.save_every_epoch and epoch > epoch_seen, not scan.clean)
            epoch_seen = epoch
            if bad_ids:  # one rank's part held it: every rank stops on that rank's line
                dist.agree(lambda: scan.raise_first(dist.gather_objects(scan.found)))
            if not unscanned and not scanned:
                scan.cleared_everywhere()
                scanned = True
            if stopping:
                result.exit_code = _stop(stop, dist, checkpoints, cfg, log, step, lambda: save([ckpt.step_tag(step)], True))
                break
            due: list[str] = []  # tags due at this step: written once, the others linked to it
            if finite and step < cfg.num_steps and (cfg.always_save_checkpoint and (step % cfg.save_every == 0 or timed) or epoch_end):
                due.append(ckpt.step_tag(step))
                if epoch_end:
                    log.info(f"step {step}: epoch {epoch} of train_data begins; checkpoint {ckpt.step_tag(step)} (save_every_epoch)")
            if finite and val_batches is not None and (step % cfg.eval_every == 0 or step == cfg.num_steps):
                t_eval = time.perf_counter()
                val = evaluate(net, val_batches(), dist, precision)
                window_excluded += time.perf_counter() - t_eval
                result.val_losses[step] = val
                log.info(f"step {step} | val loss {val:.4f} | ppl {perplexity(val):.2f}" + (" (best)" if val < best_val else ""))
                record({"val_loss": val, "val_ppl": perplexity(val)})
                if val < best_val:
                    best_val = val
                    due.append("best")
            if step == cfg.num_steps:
                if tags := (["final", *due] if cfg.save_final else due):
                    save(tags, block=True)
                if cfg.active_expert is not None:
                    moe.finish_expert_run(net, cfg, dist, log.info)
            elif due:
                window_excluded += save(due)
        checkpoints.wait()
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


def _stop(stop: StopFlag, dist: Dist, checkpoints: Checkpointer, cfg: TrainConfig, log: RunLog, step: int, save) -> int:
    """Save the last completed step if the grace period allows it; returns the exit code for the signal."""
    waited = time.monotonic() - stop.received_at if stop.raised else 0.0
    cost = checkpoints.save_cost
    fits = cost is None or waited + 1.25 * cost < cfg.preemption_grace_s
    (fits,) = dist.any_flag(fits and dist.is_main)
    if fits:
        save()
        log.info(f"stopped by signal at step {step}: checkpoint {ckpt.step_tag(step)} written; resume with --resume auto")
    else:
        log.warn(f"stopped by signal at step {step}: a save (~{cost:.0f}s) does not fit the "
                 f"{cfg.preemption_grace_s:.0f}s grace period; the newest periodic checkpoint is the resume point")
    return EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM


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

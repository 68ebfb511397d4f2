"""A run's checkpoints across ranks: what is gathered where, who writes, who waits, who reads.

- **Saving.** Rank 0 first waits for its previous background write (at most one copy of the state
  in host RAM), while the other ranks wait on the host group's long timeout
  (``distributed.save_timeout_s``), never in an NCCL collective: a slow volume delays a run, it does
  not kill it. Then the full weights and optimizer state are gathered to rank 0's CPU (nothing on
  the other ranks) and written on a background thread. Tags due at one step share one write.
- **Restoring.** Only rank 0 reads the tag (the optimizer state memory-mapped); tensors are
  broadcast one at a time and each rank keeps its shard, so resuming costs a shard of host RAM per
  rank instead of a whole copy each. A bad tag fails on every rank with rank 0's one-line reason.
- **FSDP runs** write step and ``best`` tags sharded instead (training/sharded_checkpoint.py): every
  rank stages its own shard to CPU and writes it in the background, no gather. ``final`` is still
  gathered into the single file that export and the next stage read. A sharded tag restores under
  any strategy and world size, each rank reading its own slices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from training import checkpoint as ckpt
from training.atomic import remove_stale_temporaries
from training.distributed import Dist
from training.sharded_checkpoint import ShardedWriter, checkpoint_group, load_sharded


@dataclass
class Restored:
    """What a resumed run continues from (the weights and optimizer are already loaded)."""

    tag: str
    step: int
    state: dict[str, Any]  # scheduler, scaler, loader, tokens_seen, best_val_loss, world_size
    rng: dict[str, Any] | None  # this rank's RNG states; None when the world size changed


class Checkpointer:
    def __init__(self, directory: str | Path, dist: Dist, config: dict[str, Any], keep_last_n: int, tied: bool,
                 warn: Callable[[str], None], sharded: bool | None = None) -> None:
        """``sharded``: step and best tags as DCP folders; default: under FSDP (False measures the gathered way)."""
        self.directory = Path(directory)
        self.dist, self.config, self.tied, self.warn = dist, config, tied, warn
        if dist.is_main and self.directory.is_dir():
            remove_stale_temporaries(self.directory)  # a killed writer's temporaries; only the writing rank may touch them

        def after_write(tag: str) -> None:
            if tag.startswith("step"):
                ckpt.prune(self.directory, keep_last_n, protect={tag})

        self.writer = ckpt.AsyncCheckpointer(self.directory, lambda snap: after_write(snap.tag))
        timeout = float(config.get("distributed", {}).get("save_timeout_s", 1800))
        self.group = checkpoint_group(dist, timeout)  # on every rank: DCP tags load under any strategy
        self.sharded = ShardedWriter(self.directory, dist, self.group, after_write) if (
            dist.strategy == "fsdp" if sharded is None else sharded) else None
        self.save_cost: float | None = None  # seconds the last save took, gather and write
        self.last_save = time.monotonic()
        self.last_saved = True  # False when the last save was refused: the weights were not finite

    def weights_finite(self, net: torch.nn.Module) -> bool:
        """Every rank's (local shard of the) weights is free of NaN and inf, agreed across ranks."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in net.parameters()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True
        (broken,) = self.dist.any_flag(not finite)
        return not broken

    def save(self, tags: list[str], step: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], rng: dict[str, Any], block: bool = False) -> bool:
        """Write ``tags[0]`` (the rest, and ``latest``, become links to it); ``block`` waits for the write (final, stop).

        Weights holding NaN or inf are never written (a resume from them could only diverge again,
        and ``best`` or ``final`` would name garbage): the previous checkpoints stay as they are, a
        warning says so, and False is returned.
        """
        t0 = time.monotonic()
        self.last_saved = self.weights_finite(net)
        if not self.last_saved:
            newest = next((tag for _, tag in ckpt.list_tags(self.directory)), None)
            self.warn(f"step {step}: the weights hold NaN or inf; {', '.join(tags)} not written, "
                      + (f"the newest checkpoint {self.directory / newest} is kept" if newest else "no earlier checkpoint exists"))
            return False
        if self.sharded is not None:
            if "final" not in tags:
                full = {**state, "rng": self.dist.gather_objects(rng)}
                self.sharded.save(tags[0], [*tags[1:], ckpt.LATEST], step, net, optimizer, self.tied, full, self.config, block)
                self.save_cost = time.monotonic() - t0 + self.sharded.last_seconds
                self.last_save = time.monotonic()
                return True
            self.sharded.wait()
        if self.dist.is_main:
            self.writer.wait()
        self.dist.slow_barrier()
        full = {**state, "optimizer": self.dist.optimizer_state(net, optimizer), "rng": self.dist.gather_objects(rng)}
        weights = self.dist.model_state(net, self.tied)
        if self.dist.is_main:
            live = ckpt.live_storages(list(net.parameters()), optimizer.state)
            aliases = [*tags[1:], ckpt.LATEST]  # seed 004: the newest save is always there under one name
            self.writer.save(ckpt.capture(tags[0], step, weights, full, self.config, live, aliases), block=block)
        del full, weights
        self.save_cost = time.monotonic() - t0 + self.writer.last_seconds
        self.last_save = time.monotonic()
        return True

    def poll(self) -> None:
        self.writer.poll()
        if self.sharded is not None:
            self.sharded.poll()

    def wait(self) -> None:
        """The last write is whole on disk, and every rank knows it (the end of a run)."""
        if self.sharded is not None:
            self.sharded.wait()
        if self.dist.is_main:
            self.writer.wait()
        self.dist.slow_barrier()

    def restore(self, spec: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Restored | None:
        """Load ``spec`` (``auto``, a directory or a tag path) into ``net`` and ``optimizer``; None when
        ``auto`` finds no checkpoint. Errors are raised on every rank with rank 0's message."""
        loaded, header = None, None
        if self.dist.is_main:
            try:
                loaded = ckpt.resolve_resume(spec, self.directory, self.warn)
                if loaded is not None:
                    small = {k: v for k, v in loaded.state.items() if k not in ("optimizer", "rng")}
                    where = Path(spec) if spec != "auto" else self.directory
                    header = {"tag": loaded.tag, "step": loaded.step, "state": small, "rng": loaded.state["rng"],
                              "path": str(where / loaded.tag if where.is_dir() else where),
                              "sharded": str(loaded.sharded) if loaded.sharded else None}
            except ckpt.CheckpointError as exc:
                header = {"error": str(exc), "missing": isinstance(exc, ckpt.NoSuchCheckpoint)}
        header = self.dist.broadcast_object(header)
        if header is None:
            return None
        if "error" in header:
            raise (ckpt.NoSuchCheckpoint if header["missing"] else ckpt.CheckpointError)(header["error"])
        if header["sharded"]:
            load_sharded(Path(header["sharded"]), net, optimizer, self.dist, self.tied, self.group)
        else:
            self.dist.load_model_state(net, loaded.weights if loaded else None, self.tied, source=f"{header['path']}.safetensors")
            self.dist.load_optimizer_state(net, optimizer, loaded.state["optimizer"] if loaded else None)
        del loaded
        rngs = header["rng"]
        rng = rngs[self.dist.rank] if len(rngs) == self.dist.world_size else None
        return Restored(header["tag"], int(header["step"]), header["state"], rng)

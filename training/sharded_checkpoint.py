"""Sharded checkpoints of FSDP runs: every rank writes its own shard, in the background.

Under ``distributed.strategy: fsdp`` a step or ``best`` tag is a folder ``<tag>.dcp/`` written by
torch.distributed.checkpoint (DCP): one ``__<rank>_0.distcp`` file per rank with that rank's shards
of the weights and AdamW state, DCP's ``.metadata`` (which slice of which tensor lies where), and
podtrain's ``podtrain.json`` (format, step), ``state.pt`` (scheduler, scaler, loader, the RNG of
every rank) and ``config.json``.

- **Saving** is torchtitan's scheme. Wait for the previous save; copy this rank's shards to CPU
  memory (the only time training is blocked: a shard, not the model, and no gather); then
  ``dcp.async_save`` writes them on a background thread, on a gloo group of its own, while training
  goes on. Every rank writes in parallel; no rank holds more than its shard plus one staged copy.
- **Exactly once.** The folder is written as ``.tmp-<tag>.dcp.<step>`` and renamed to
  ``<tag>.dcp`` by rank 0 when its save has finished. Rank 0 is DCP's coordinator: it writes
  ``.metadata`` only after every rank has reported its file written, so a renamed folder is whole.
  A SIGKILL mid-write leaves a temporary that no reader lists and the next run deletes; the previous
  tag is untouched. An existing tag (``best``) is swapped out in one ``renameat2(RENAME_EXCHANGE)``.
- **Restoring**: each rank reads the slices its shards need (DCP reshards), so a tag written by 2
  ranks resumes on 1 (FSDP, DDP or one plain process) and the other way round.
- ``final`` stays the single-file safetensors tag (gathered once, at the end), which export,
  sampling and the next stage read; ``python -m training.consolidate <dir>/<tag>.dcp``
  (training/consolidate.py) turns any sharded tag into that format.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from training import checkpoint as ckpt
from training.atomic import TMP_PREFIX, atomic_write_json, replace_dir
from training.distributed import Dist

MODEL, OPTIM = "model", "optim"  # the two top-level keys of a sharded tag's state dict


def train_state(net: nn.Module, optimizer: torch.optim.Optimizer, tied: bool) -> dict[str, Any]:
    """This rank's shards of weights and optimizer state, keyed by parameter name (DTensors under FSDP).

    A tied head is stored once, as ``embed_tokens.weight`` (as in the safetensors format)."""
    model_sd, optim_sd = get_state_dict(net, optimizer)
    if tied:
        model_sd.pop("lm_head.weight", None)
    return {MODEL: model_sd, OPTIM: optim_sd}


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer (its ``stage`` is the blocking copy to CPU), with the test suite's slow-volume hook."""

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        ckpt._slow_disk_for_tests()
        return super().write_data(plan, planner)


class ShardedWriter:
    """At most one asynchronous DCP save in flight; rank 0 publishes each tag once it is whole.

    ``after_write(tag)`` runs on rank 0 after a tag is published (pruning old step tags).
    """

    def __init__(self, directory: Path, dist: Dist, group: Any, after_write: Callable[[str], None]) -> None:
        self.directory, self.dist, self.group, self.after_write = directory, dist, group, after_write
        self._future: Future | None = None
        self._pending: tuple[Path, str, list[str], float] | None = None
        self._done_at = 0.0
        self.last_seconds = 0.0  # the last save's background write, start to finish

    def save(self, tag: str, aliases: list[str], step: int, net: nn.Module, optimizer: torch.optim.Optimizer,
             tied: bool, state: dict[str, Any], config: dict[str, Any], block: bool) -> None:
        """Stage this rank's shards and start writing them; ``state`` (small, every rank's RNG included)
        is written by rank 0. ``block`` waits until the tag is published (a stop, the end of a run)."""
        self.wait()
        tmp = self.directory / f"{TMP_PREFIX}{tag}{ckpt.DCP_SUFFIX}.{step}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({**state, "step": step, "format": ckpt.FORMAT}, tmp / ckpt.SHARDED_STATE)
            atomic_write_json(tmp / ckpt.SHARDED_CONFIG, config)
            atomic_write_json(tmp / ckpt.SHARDED_META, {"format": ckpt.FORMAT, "step": step, "world_size": self.dist.world_size})
        start = time.perf_counter()
        future = dcp.async_save(train_state(net, optimizer, tied), storage_writer=_Writer(tmp), process_group=self.group)
        future.add_done_callback(lambda _: setattr(self, "_done_at", time.perf_counter()))
        self._future, self._pending = future, (tmp, tag, aliases, start)
        if block:
            self.wait()

    def poll(self) -> None:
        """Publish a finished save (called every step), re-raising its failure: fail fast."""
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the save in flight; on rank 0, rename its folder into place and link its aliases."""
        if self._future is None:
            return
        future, (tmp, tag, aliases, start) = self._future, self._pending  # type: ignore[misc]
        self._future = self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # every rank has stopped writing: DCP gathered their results
            raise ckpt.CheckpointError(f"{self.directory}: could not write checkpoint {tag}: {failure(exc)}; "
                                       f"earlier checkpoints are untouched") from exc
        self.last_seconds = max(0.0, self._done_at - start)
        if self.dist.is_main:
            publish(self.directory, tmp, tag, aliases)
            self.after_write(tag)


def failure(exc: BaseException) -> str:
    """One line for a DCP failure: the first failing rank and its error (DCP's own text is every rank's traceback)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (cause, _) = next(iter(sorted(exc.failures.items())))
        return f"rank {rank}: {failure(cause)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:300]


def publish(directory: Path, tmp: Path, tag: str, aliases: list[str]) -> None:
    """Make the whole folder ``tmp`` the tag ``tag`` and its ``aliases`` (folders of hard links)."""
    final = directory / f"{tag}{ckpt.DCP_SUFFIX}"
    replace_dir(tmp, final)
    for alias in aliases:
        staging = directory / f"{TMP_PREFIX}{alias}{ckpt.DCP_SUFFIX}.link"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for path in final.iterdir():
            try:
                (staging / path.name).hardlink_to(path)
            except OSError:
                shutil.copyfile(path, staging / path.name)
        replace_dir(staging, directory / f"{alias}{ckpt.DCP_SUFFIX}")
    for name in (tag, *aliases):
        ckpt.remove_files_tag(directory, name)  # an older same-named tag in the single-file format


def model_shapes(folder: Path) -> dict[str, torch.Tensor]:
    """Parameter name -> an empty meta tensor of its saved shape, from DCP's ``.metadata``."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    prefix = f"{MODEL}."
    return {key[len(prefix):]: torch.empty(meta.size, device="meta")
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def load_sharded(folder: Path, net: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, tied: bool, group: Any) -> None:
    """Load a sharded tag into ``net`` and ``optimizer`` on every rank, whatever the world size that wrote it.

    Names and shapes are checked first (one line naming the first mismatch, the same on every rank)."""
    dist.check_weights(net, model_shapes(folder), tied, source=str(folder))
    state = train_state(net, optimizer, tied)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), process_group=group)
    except (Exception, CheckpointException) as exc:  # a truncated or missing shard file
        raise ckpt.CheckpointError(f"{folder}: unreadable shards ({failure(exc)})") from exc
    set_state_dict(net, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIM],
                   options=StateDictOptions(strict=not tied))


def checkpoint_group(dist: Dist, timeout_s: float) -> Any:
    """A gloo group for checkpoint collectives alone: DCP's background thread must not share one with the
    training loop's flags (two threads issuing collectives on one group would interleave them)."""
    if not torch_dist.is_available() or not torch_dist.is_initialized():
        return None
    import datetime

    return torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

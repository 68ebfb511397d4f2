"""Checkpoints: ``<tag>.safetensors`` + ``<tag>.state.pt`` + ``<tag>.config.json``, written atomically.

A tag is three files, or (FSDP runs) a folder ``<tag>.dcp`` of every rank's shards, written as a
temporary and renamed whole (see training/sharded_checkpoint.py); both kinds are listed, resumed
and pruned alike. A file tag is whole when its three files exist, the safetensors file parses, the state loads with
``weights_only=True`` and both carry the same step (the weights file is written last and records
the step in its metadata, so a crash between two renames of an overwritten tag is detected, not
mixed). ``--resume auto`` takes the newest whole tag and reports, then skips, a newer broken one.

Saving is split in two so training does not wait on disk: :func:`capture` detaches the state from
the live training tensors (copying only what still aliases them), :class:`AsyncCheckpointer`
writes it on a background thread. Weights are streamed into a file podtrain names itself (no
library temporary), and a tag due at the same step as another (``best`` and ``stepN``) is a set
of hard links to the first, not a second write.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors
import torch

from training.atomic import atomic_path, atomic_write_json
from training.checkpoint_tags import DCP_SUFFIX, SHARDED_META, STEP_TAG, list_tags

FORMAT = "podtrain-checkpoint-1"
SUFFIXES = (".state.pt", ".config.json", ".safetensors")  # write order: weights last
# A sharded tag (FSDP runs, training/sharded_checkpoint.py) is a folder <tag>.dcp holding DCP's files and these:
SHARDED_STATE, SHARDED_CONFIG = "state.pt", "config.json"  # beside checkpoint_tags.SHARDED_META
DCP_METADATA = ".metadata"  # written by DCP's coordinator once every rank's shard is on disk
_OTHER_STEP_NAME = re.compile(r"^(?:checkpoint-|step[-_]?)?(\d+)$")  # seed 004's checkpoint-1000, step1000, 1000
LATEST = "latest"  # every save also links this tag (seed 004's latest.pt)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path."""


class NoSuchCheckpoint(CheckpointError):
    """``--resume`` names no checkpoint at all: a bad flag (exit 2), not a damaged file."""


def step_tag(step: int) -> str:
    return f"step{step:07d}"


def tag_path(spec: str | Path) -> Path:
    """The tag base path ``spec`` names: a checkpoint file's suffix removed, and other projects'
    names for a step turned into podtrain's tag: seed 004's ``checkpoint-1000.pt`` and ``latest.pt``,
    ``step1000``, a bare ``1000`` -> ``step0001000``, ``latest``."""
    path = Path(spec)
    for suffix in (*SUFFIXES, DCP_SUFFIX, ".pt"):
        if path.name.endswith(suffix):
            path = path.with_name(path.name[: -len(suffix)])
            break
    match = _OTHER_STEP_NAME.match(path.name)
    if match and path.name != step_tag(int(match.group(1))):
        path = path.with_name(step_tag(int(match.group(1))))
    return path


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG states as weights_only-loadable values (numpy's array becomes a list).

    Only the rank's own GPU: a state list of every visible GPU would not restore on a pod with fewer.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class Snapshot:
    """Everything a checkpoint holds, on CPU and detached from the live training state."""

    tag: str
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    config: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # tags due at the same step: hard links to ``tag``


def capture(tag: str, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], config: dict[str, Any],
            live: set[int], aliases: list[str] | None = None) -> Snapshot:
    """A snapshot that training can no longer change.

    Full state dicts gathered with ``cpu_offload`` are already fresh CPU copies (GPU runs, FSDP);
    only tensors whose storage is in ``live`` (the data pointers of the parameters and optimizer
    state: a CPU run's state dict returns them as they are) are copied, so a 4B save holds one copy
    of the state in host RAM, not two.
    """

    def detach(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type != "cpu":
                return value.to("cpu")
            return value.clone() if value.untyped_storage().data_ptr() in live else value
        if isinstance(value, dict):
            return {k: detach(v) for k, v in value.items()}
        if isinstance(value, list):
            return [detach(v) for v in value]
        if isinstance(value, tuple):
            return tuple(detach(v) for v in value)
        return value

    cpu_weights = {k: detach(v).contiguous() for k, v in weights.items()}
    return Snapshot(tag, step, cpu_weights, detach({**state, "step": step, "format": FORMAT}), config, aliases=list(aliases or []))


def live_storages(*tensor_trees: Any) -> set[int]:
    """Data pointers of every tensor in the given trees (parameters, optimizer state)."""
    found: set[int] = set()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            found.add(local.untyped_storage().data_ptr())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for tree in tensor_trees:
        walk(tree)
    return found


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}  # a safetensors dtype name -> torch dtype


@dataclass
class LazyTensor:
    """A tensor written when its turn comes: an export builds each one (a transpose, a fused q/k/v)
    only while it is being written, so a file is streamed without the whole model in memory."""

    shape: list[int]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor | LazyTensor], metadata: dict[str, str]) -> None:
    """Stream ``tensors`` into ``path`` in the safetensors format, one tensor at a time.

    The library's ``save_file`` writes through a temporary of its own naming (left behind by a
    SIGKILL, unknown to podtrain's clean-up) and ``save`` builds the whole file in memory; this
    writes the header, then each tensor's bytes straight from its storage (a :class:`LazyTensor`
    is materialised just before its bytes are written, and dropped after).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        size = t.nbytes if isinstance(t, LazyTensor) else t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, t in tensors.items():
            if isinstance(t, LazyTensor):
                t = t.load().to(t.dtype)
                if list(t.shape) != header[name]["shape"]:
                    raise ValueError(f"{name}: built with shape {list(t.shape)}, declared {header[name]['shape']}")
            if t.numel():
                fh.write(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def snapshot_bytes(snap: Snapshot) -> int:
    """Bytes the three files will take, within a small margin (tensor data dominates)."""
    return _nbytes(snap.weights) + _nbytes(snap.state) + 1_000_000


def write_snapshot(directory: str | Path, snap: Snapshot) -> None:
    """Write the three files of ``snap``; on failure (a full disk) earlier checkpoints are untouched.

    Free space is checked first, so a volume that cannot hold the checkpoint fails before anything
    is written; a failure during the write (a race with another writer) is reported the same way.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    need, free = snapshot_bytes(snap), shutil.disk_usage(directory).free
    if need > free:
        raise CheckpointError(
            f"{directory}: could not write checkpoint {snap.tag}: No space left on device "
            f"(needs {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free); earlier checkpoints are untouched"
        )
    try:
        with atomic_path(directory / f"{snap.tag}.state.pt") as tmp:
            torch.save(snap.state, tmp)
        atomic_write_json(directory / f"{snap.tag}.config.json", snap.config)
        with atomic_path(directory / f"{snap.tag}.safetensors") as tmp:
            _slow_disk_for_tests()
            write_safetensors(tmp, snap.weights, {"format": FORMAT, "step": str(snap.step), **snap.metadata})
        for alias in snap.aliases:
            link_tag(directory, snap.tag, alias)
        for name in (snap.tag, *snap.aliases):
            remove_sharded_tag(directory, name)  # an older same-named sharded tag: one format per tag name
    except Exception as exc:  # OSError, or torch/safetensors wrapping one (torch reports ENOSPC as RuntimeError)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise CheckpointError(
            f"{directory}: could not write checkpoint {snap.tag}: {reason} "
            f"({shutil.disk_usage(directory).free / 1e6:,.1f} MB free); earlier checkpoints are untouched"
        ) from exc


def link_tag(directory: Path, source: str, alias: str) -> None:
    """Make ``alias`` the same checkpoint as ``source`` with hard links (a copy where links are not
    supported); each file is linked to a temporary and renamed over, weights last, so the alias is
    never half old and half new."""
    for suffix in SUFFIXES:
        with atomic_path(directory / f"{alias}{suffix}") as tmp:
            tmp.unlink()
            try:
                os.link(directory / f"{source}{suffix}", tmp)
            except OSError:
                shutil.copyfile(directory / f"{source}{suffix}", tmp)


def _slow_disk_for_tests() -> None:
    """Fault injection: ``PODTRAIN_TEST_SLOW_SAVE_S`` makes every weights write take that long (a slow volume)."""
    delay = float(os.environ.get("PODTRAIN_TEST_SLOW_SAVE_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def remove_files_tag(directory: Path, tag: str) -> None:
    """Delete the file tag ``tag`` if there is one (weights first: a partly deleted tag is never "whole")."""
    for suffix in reversed(SUFFIXES):
        Path(directory, f"{tag}{suffix}").unlink(missing_ok=True)


def remove_sharded_tag(directory: Path, tag: str) -> None:
    """Delete the sharded tag ``tag`` if there is one: renamed to a temporary first, so it vanishes at once."""
    folder = Path(directory, f"{tag}{DCP_SUFFIX}")
    if folder.is_dir():
        doomed = folder.with_name(f".tmp-{folder.name}.deleted")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class Loaded:
    tag: str
    step: int
    weights: dict[str, torch.Tensor]  # empty for a sharded tag: every rank reads its own shards
    state: dict[str, Any]
    config: dict[str, Any]
    sharded: Path | None = None  # the <tag>.dcp folder of a sharded tag


def read_sharded(directory: str | Path, tag: str) -> Loaded:
    """The header of the sharded tag ``<directory>/<tag>.dcp`` (step, training state, config), validated;
    its tensors stay on disk. Raise CheckpointError saying what is wrong."""
    folder = Path(directory, f"{tag}{DCP_SUFFIX}")
    for name in (SHARDED_META, SHARDED_STATE, SHARDED_CONFIG, DCP_METADATA):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing (checkpoint {tag} is incomplete)")
    try:
        meta = json.loads((folder / SHARDED_META).read_text(encoding="utf-8"))
        config = json.loads((folder / SHARDED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable {SHARDED_META} or {SHARDED_CONFIG} ({exc})") from None
    try:
        state = torch.load(folder / SHARDED_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle
        raise CheckpointError(f"{folder / SHARDED_STATE}: unreadable training state ({exc})") from None
    if meta.get("format") != FORMAT or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: not a {FORMAT} checkpoint")
    if meta.get("step") != state.get("step"):
        raise CheckpointError(f"{folder}: {SHARDED_META} (step {meta.get('step')}) and state (step {state.get('step')}) disagree")
    _check_shard_files(folder, tag)
    return Loaded(tag, int(state["step"]), {}, state, config, sharded=folder)


def _check_shard_files(folder: Path, tag: str) -> None:
    """Every byte range DCP's ``.metadata`` points at exists: a damaged shard file is found here, while
    ``--resume auto`` can still fall back to an older tag, not halfway through loading."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data or {}
    except Exception as exc:  # a truncated or foreign pickle
        raise CheckpointError(f"{folder / DCP_METADATA}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (folder / name).stat().st_size if (folder / name).is_file() else 0
        if size < end:
            raise CheckpointError(f"{folder / name}: {size} of {end} bytes (checkpoint {tag} is damaged)")


def load_tag(directory: str | Path, tag: str) -> Loaded:
    """Load and validate one tag (a sharded one: its header only); raise CheckpointError saying what is wrong."""
    directory = Path(directory)
    base = directory / tag
    if Path(directory, f"{tag}{DCP_SUFFIX}").is_dir() and not any(Path(f"{base}{s}").exists() for s in SUFFIXES):
        return read_sharded(directory, tag)
    for suffix in SUFFIXES:
        if not Path(f"{base}{suffix}").is_file():
            raise CheckpointError(f"{base}{suffix}: missing (checkpoint {tag} is incomplete)")
    try:
        with safetensors.safe_open(f"{base}.safetensors", framework="pt") as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncation
        raise CheckpointError(f"{base}.safetensors: unreadable weights ({exc})") from None
    try:  # memory-mapped: optimizer tensors are paged in as they are broadcast, not read whole first
        state = torch.load(f"{base}.state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, bad pickle
        raise CheckpointError(f"{base}.state.pt: unreadable training state ({exc})") from None
    try:
        config = json.loads(Path(f"{base}.config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{base}.config.json: unreadable config ({exc})") from None
    if meta.get("format") != FORMAT or state.get("format") != FORMAT:
        raise CheckpointError(f"{base}: not a {FORMAT} checkpoint")
    if str(state.get("step")) != meta.get("step"):
        raise CheckpointError(f"{base}: weights (step {meta.get('step')}) and state (step {state.get('step')}) disagree")
    return Loaded(tag, int(state["step"]), weights, state, config)


def find_latest(directory: str | Path, warn: Callable[[str], None]) -> Loaded | None:
    """The newest whole checkpoint in ``directory``; broken newer ones are reported through ``warn``.

    Read-only, so every rank may call it: leftovers of a killed writer are removed by the one
    process that writes (``remove_stale_temporaries`` on rank 0, before its first save).
    """
    for _, tag in list_tags(directory):
        try:
            return load_tag(directory, tag)
        except CheckpointError as exc:
            warn(f"skipping broken checkpoint: {exc}")
    return None


def resolve_resume(spec: str, checkpoint_dir: str | Path, warn: Callable[[str], None]) -> Loaded | None:
    """``auto`` = newest whole tag in ``checkpoint_dir`` (None when there is none); else a tag path,
    a directory, or a bare tag name looked up in ``checkpoint_dir`` (``--resume best``, and in seed
    004's spelling ``--resume checkpoints/pretrain/checkpoint-1000.pt``, ``latest.pt``; see :func:`tag_path`)."""
    if spec == "auto":
        return find_latest(checkpoint_dir, warn)
    path = Path(spec)
    if not path.is_dir() or path.name.endswith(DCP_SUFFIX):
        path = tag_path(spec)  # a file's or sharded folder's suffix, seed 004's checkpoint-1000.pt / latest.pt
    if path.is_dir():
        loaded = find_latest(path, warn)
        if loaded is None:
            raise NoSuchCheckpoint(f"--resume {spec}: no whole checkpoint in that directory{_existing(path)}")
        return loaded
    for base in (path, Path(checkpoint_dir) / path.name):
        if any(Path(f"{base}{suffix}").exists() for suffix in (*SUFFIXES, DCP_SUFFIX)):
            return load_tag(base.parent, base.name)
    raise NoSuchCheckpoint(f"--resume {spec}: no such checkpoint{_existing(Path(checkpoint_dir))}")


def _existing(directory: Path) -> str:
    """What ``--resume`` could have named instead, for its error line."""
    tags = [tag for _, tag in list_tags(directory)]
    there = f"{directory} holds {', '.join(tags)}" if tags else f"no checkpoints in {directory}"
    return f"; {there}; --resume auto takes the newest"


def prune(directory: str | Path, keep_last_n: int, protect: set[str]) -> list[str]:
    """Delete step tags beyond the newest ``keep_last_n``; never ``best``, ``final`` or ``protect``."""
    directory = Path(directory)
    steps = sorted((int(m.group(1)), tag) for _, tag in list_tags(directory) if (m := STEP_TAG.match(tag)))
    doomed = [tag for _, tag in steps[:-keep_last_n] if tag not in protect] if len(steps) > keep_last_n else []
    for tag in doomed:
        remove_files_tag(directory, tag)
        remove_sharded_tag(directory, tag)
    return doomed


def copy_original_config(source: str | Path | None, directory: str | Path) -> None:
    """Copy the config file the run started from beside its checkpoints (reproducibility)."""
    if source is None:
        return
    source, directory = Path(source), Path(directory)
    target = directory / source.name
    if source.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


class AsyncCheckpointer:
    """Writes snapshots on one background thread; at most one write in flight.

    ``save`` waits for the previous write first (bounding memory to one extra copy of the state)
    and re-raises a failure of that write, so a full disk stops the run instead of passing silently.
    ``after_write`` runs on the writer thread once a tag is whole (pruning old tags).
    """

    def __init__(self, directory: str | Path, after_write: Callable[[Snapshot], None] | None = None) -> None:
        self.directory = Path(directory)
        self.after_write = after_write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = 0.0

    def _write(self, snap: Snapshot) -> None:
        start = time.perf_counter()
        try:
            write_snapshot(self.directory, snap)
            if self.after_write:
                self.after_write(snap)
        except BaseException as exc:
            self._error = exc
        self.last_seconds = time.perf_counter() - start

    def save(self, snap: Snapshot, block: bool = False) -> None:
        self.wait()
        if block:
            self._write(snap)
            self._raise()
            return
        self._thread = threading.Thread(target=self._write, args=(snap,), name=f"ckpt-{snap.tag}")
        self._thread.start()

    def poll(self) -> None:
        """Re-raise the failure of a finished background write (called every step: fail fast)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

"""``python -m training.consolidate CKPT/TAG.dcp [--out CKPT/TAG]``: a sharded (DCP) tag as one safetensors tag.

FSDP runs write their step and ``best`` tags as DCP folders (training/sharded_checkpoint.py); export,
sampling, evaluation and ``init_from`` read the single-file format. This reads a folder whole in one
process (no process group, any world size wrote it) and writes ``<tag>.safetensors``,
``<tag>.state.pt`` (optimizer included, so the result also resumes) and ``<tag>.config.json``,
atomically, beside the folder unless ``--out`` says elsewhere. It holds the full weights and AdamW
state in host RAM once (16 bytes per parameter), as the gathered format always did.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from training import checkpoint as ckpt
from training.sharded_checkpoint import MODEL, OPTIM, failure


def _nest(flat: dict[str, Any], paths: dict[str, tuple]) -> dict[str, Any]:
    """Rebuild the nested state dict from DCP's flat keys and its recorded paths (lists where the keys are 0..n-1)."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        path = paths.get(key, (key,))
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
            return [node[i] for i in range(len(node))]
        return node

    return lists(root)


def consolidate(folder: Path, out_base: Path) -> ckpt.Snapshot:
    """Read a sharded tag whole (one process, no group) and write it as ``out_base`` in the single-file format."""
    header = ckpt.read_sharded(folder.parent, folder.name[: -len(ckpt.DCP_SUFFIX)])
    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    flat = {key: torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
            for key, meta in metadata.state_dict_metadata.items()}
    try:
        dcp.load(flat, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise ckpt.CheckpointError(f"{folder}: unreadable shards ({failure(exc)})") from exc
    nested = _nest(flat, metadata.planner_data or {})
    state = {**header.state, "optimizer": nested[OPTIM]}
    snap = ckpt.Snapshot(out_base.name, header.step, nested[MODEL], state, header.config)
    ckpt.write_snapshot(out_base.parent, snap)
    return snap


def main(argv: list[str] | None = None) -> int:
    """``python -m training.consolidate CKPT/TAG.dcp [--out CKPT/TAG]``: one line per outcome."""
    parser = argparse.ArgumentParser(prog="python -m training.consolidate", description=consolidate.__doc__)
    parser.add_argument("folder", type=Path, help="a sharded tag: <checkpoint_dir>/<tag>.dcp")
    parser.add_argument("--out", type=Path, help="tag path to write (default: the same tag beside the folder)")
    args = parser.parse_args(argv)
    folder = args.folder
    if not folder.name.endswith(ckpt.DCP_SUFFIX):
        folder = folder.with_name(folder.name + ckpt.DCP_SUFFIX)
    out = args.out or folder.with_name(folder.name[: -len(ckpt.DCP_SUFFIX)])
    t0 = time.perf_counter()
    try:
        snap = consolidate(folder, out)
    except ckpt.CheckpointError as exc:
        print(f"consolidate: error: {exc}", file=sys.stderr)
        return 2
    size = ckpt.snapshot_bytes(snap) / 1e9
    print(f"consolidated {folder} -> {out}.safetensors (+ .state.pt, .config.json): step {snap.step}, "
          f"{len(snap.weights)} tensors, {size:.2f} GB in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

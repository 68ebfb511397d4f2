"""The preset menu of ``train`` with no config, and seed 000's JSON preset shape.

The menu lists the training configs among ``configs/*.yaml`` and ``configs/*.json`` (a file with a
``model`` or ``train_data`` key: the sources registry beside them is not one) with their descriptions. Under torchrun
only rank 0 asks (every rank inherits torchrun's stdin, so two readers would split the answer);
the choice reaches the other ranks through torchrun's own key-value store before any process
group exists, because the backend depends on the config being chosen.

A JSON preset of seed 000's shape (``model.hidden_size``, ``train.train_tokens``, ...) is
translated onto the schema: its token budgets become step counts for the world size at hand, and
its data is read where ``orchestrate --experiment NAME`` leaves token shards.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import select
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from training.token_shards import TOKEN_SUFFIX, TokenShardError, read_header

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NANOGPT_DEFAULTS = PROJECT_ROOT / "configs" / "gpt2_124m.yaml"  # `train key=value` without a config (seed 001)
PRESET_SUFFIXES = (".yaml", ".yml", ".json")
STORE_KEY = "podtrain/preset"
DATA_READY_KEY = "podtrain/data-ready"
DATA_WAIT = datetime.timedelta(days=2)  # ranks other than 0 wait this long for rank 0 to prepare a preset's data
PIPE_WAIT_S = 30.0  # a piped stdin gets this long to deliver the choice; a pod's closed stdin fails at once


class PresetError(ValueError):
    """No preset could be chosen or a seed 000 preset is malformed; one line naming file and key."""


def preset_dirs() -> list[Path]:
    """``./configs`` first (a user's own presets), then the project's."""
    dirs = [Path.cwd() / "configs", PROJECT_ROOT / "configs"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def _read_mapping(path: Path) -> dict[str, Any] | None:
    """A JSON or YAML file's top-level mapping; None when it is unreadable or not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _description(path: Path) -> str | None:
    data = _read_mapping(path)
    if data is None or not ({"model", "train_data"} & set(data)):
        return None  # not a training config (configs/sources.yaml): not listed
    return str(data.get("description", ""))


def list_presets() -> list[tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for directory in preset_dirs():
        for path in sorted(p for p in directory.iterdir() if p.suffix in PRESET_SUFFIXES):
            if path.stem in found:
                continue
            desc = _description(path)
            if desc is not None:
                found[path.stem] = (path, desc)
    return list(found.values())


def find_preset(name: str) -> Path:
    """``configs/<name>.yaml`` from the preset directories; an unknown name lists the known ones."""
    presets = list_presets()
    for path, _ in presets:
        if path.stem == name:
            return path
    raise FileNotFoundError(f"no preset {name!r}; known: {', '.join(p.stem for p, _ in presets)}")


def choose_preset(ask: Callable[[str], str], show: Callable[[str], None]) -> Path:
    """Show a numbered menu and return the chosen preset path; re-asks on a bad answer."""
    presets = list_presets()
    if not presets:
        raise PresetError("no presets found in ./configs or the project's configs/")
    show("Choose a training preset:")
    for i, (path, desc) in enumerate(presets, 1):
        show(f"  {i}. {path.stem:<14} {path.suffix[1:]:<5} {desc}")
    while True:
        answer = ask(f"preset [1-{len(presets)}]: ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(presets):
            return presets[int(answer) - 1][0]
        by_name = [p for p, _ in presets if p.stem == answer]
        if by_name:
            return by_name[0]
        show(f"  '{answer}' is not a preset number or name")


def _ask_stdin(prompt: str) -> str:
    """``input`` on a terminal; from a pipe, one line if it comes within PIPE_WAIT_S."""
    if sys.stdin.isatty():
        return input(prompt)
    print(prompt, flush=True)
    ready, _, _ = select.select([sys.stdin], [], [], PIPE_WAIT_S)
    line = sys.stdin.readline() if ready else ""
    if not line:
        raise PresetError("no config given and no terminal or answer on stdin to choose a preset; "
                          "run `train configs/m3_medium.yaml` (or another file)")
    return line


def _launcher_store(timeout: datetime.timedelta = datetime.timedelta(hours=1)):
    """torchrun's key-value store (rank 0's choice reaches the others through it), or None alone."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timeout, wait_for_workers=False)


def pick_preset_for_all_ranks() -> Path:
    """Rank 0 shows the menu and reads the answer; every rank returns the same preset path."""
    store = _launcher_store()
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            path = choose_preset(_ask_stdin, lambda line: print(line, flush=True))
        except EOFError:
            raise PresetError("no config given and stdin closed before a preset was chosen") from None
        if store is not None:
            store.set(STORE_KEY, str(path))
        return path
    return Path(store.get(STORE_KEY).decode())


def prepare_for_all_ranks(prepare: Callable[[], None]) -> None:
    """Rank 0 runs ``prepare``; under torchrun the other ranks wait for its word in torchrun's store.

    No process group exists yet (the backend depends on the config), and preparing data can take
    hours, so the wait is a key in the launcher's store with a long timeout, not a collective. A
    failure on rank 0 is passed on, so every rank stops with the same line.
    """
    store = _launcher_store(DATA_WAIT)
    if int(os.environ.get("RANK", 0)) != 0 and store is not None:
        word = store.get(DATA_READY_KEY).decode()
        if word != "ok":
            raise PresetError(word)
        return
    try:
        prepare()
    except Exception as exc:
        if store is not None:
            store.set(DATA_READY_KEY, f"rank 0 could not prepare the data: {exc}")
        raise
    if store is not None:
        store.set(DATA_READY_KEY, "ok")


# -- seed 000's JSON preset shape --------------------------------------------------------------

SEED000_KEYS = {
    "": {"name", "description", "model", "train", "data"},
    "model": {"hidden_size", "num_layers", "num_heads", "seq_length", "vocab_size"},
    "train": {"train_tokens", "eval_tokens", "per_gpu_batch_size", "accumulation_steps", "lr", "weight_decay",
              "fused_adamw", "grad_checkpointing", "num_workers", "prefetch_factor"},
    "data": {"sources", "custom_sources", "min_text_length", "mix_strategy", "source_weights"},
}


def is_seed000(data: dict[str, Any]) -> bool:
    return isinstance(data.get("train"), dict) and isinstance(data.get("model"), dict) and "hidden_size" in data["model"]


def has_data_section(path: str | Path) -> bool:
    """A seed 000 preset whose ``data:`` names sources: ``train`` prepares them before training."""
    data = _read_mapping(Path(path)) if Path(path).suffix in PRESET_SUFFIXES else None
    section = (data or {}).get("data")
    return (data is not None and is_seed000(data) and isinstance(section, dict)
            and bool(section.get("sources") or section.get("custom_sources")))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1)) if "LOCAL_RANK" in os.environ else 1


def _shard_vocab(directory: Path) -> int | None:
    """The vocabulary the token shards were written for (largest header), None without shards."""
    sizes = []
    for path in sorted(directory.glob(f"*{TOKEN_SUFFIX}")) if directory.is_dir() else []:
        try:
            sizes.append(read_header(path).vocab_size)
        except TokenShardError:
            continue  # the loader reports a broken shard with its name
    return max(sizes, default=None)


def from_seed000(data: dict[str, Any], source: str, notes: list[str]) -> dict[str, Any]:
    """Translate a seed 000 preset onto the schema; ``notes`` says how budgets became steps."""
    for section, allowed in SEED000_KEYS.items():
        node = data.get(section, {}) if section else data
        if not isinstance(node, dict):
            raise PresetError(f"{source}: {section}: expected a mapping, got {type(node).__name__}")
        for key in node:
            if key not in allowed:
                raise PresetError(f"{source}: {section + '.' if section else ''}{key}: unknown key in a seed 000 preset "
                                  f"(known: {', '.join(sorted(allowed))})")
    model, train = data["model"], data["train"]
    name = str(data.get("name") or Path(source).stem)
    missing = [f"{sec}.{key}" for sec, node, keys in (("model", model, ("hidden_size", "num_layers", "num_heads", "seq_length")),
                                                     ("train", train, ("train_tokens", "per_gpu_batch_size")))
               for key in keys if key not in node]
    if missing:
        raise PresetError(f"{source}: {', '.join(missing)}: missing from the seed 000 preset")
    world = _world_size()
    batch, accum, seq = int(train["per_gpu_batch_size"]), int(train.get("accumulation_steps", 1)), int(model["seq_length"])
    workspace = Path("workspace")
    train_dir, val_dir = workspace / "cache" / name / "tokens" / "train", workspace / "cache" / name / "tokens" / "val"
    per_step = batch * accum * seq * world
    cfg: dict[str, Any] = {
        "description": str(data.get("description", "")),
        "train_data": str(train_dir),
        "checkpoint_dir": str(workspace / "runs" / name / "checkpoints"),
        "seq_len": seq,
        "batch_size": batch,
        "gradient_accumulation_steps": accum,
        "num_steps": max(1, math.ceil(int(train["train_tokens"]) / per_step)),
        "model": {"d_model": model["hidden_size"], "num_layers": model["num_layers"], "max_seq_len": seq,
                  "attention": {"n_heads": model["num_heads"]}},
        "optimizer": {k: train[s] for k, s in (("lr", "lr"), ("weight_decay", "weight_decay")) if s in train},
        "activation_checkpointing": bool(train.get("grad_checkpointing", False)),
        # a DataLoader keeps num_workers x prefetch_factor batches in flight; podtrain's prefetch depth
        "num_workers": int(train.get("num_workers", 2)) * int(train.get("prefetch_factor", 2)),
    }
    notes.append(f"{source}: seed 000 preset {name!r}: train.train_tokens {int(train['train_tokens']):,} / "
                 f"({batch} per GPU x {accum} accumulation x {seq} tokens x {world} ranks = {per_step:,} tokens/step) "
                 f"= {cfg['num_steps']} steps")
    if "eval_tokens" in train and _shard_vocab(val_dir) is not None:
        per_eval = batch * seq * world
        cfg["val_data"] = str(val_dir)
        cfg["eval_steps"] = max(1, math.ceil(int(train["eval_tokens"]) / per_eval))
        notes.append(f"{source}: train.eval_tokens {int(train['eval_tokens']):,} / ({batch} x {seq} x {world} ranks = "
                     f"{per_eval:,} tokens/batch) = {cfg['eval_steps']} eval steps")
    vocab = model.get("vocab_size") or _shard_vocab(train_dir)
    if vocab:
        cfg["model"]["vocab_size"] = vocab
    return cfg

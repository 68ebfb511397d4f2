"""Other projects' config key names, accepted as aliases of podtrain's.

People arrive with nanoGPT's ``train.py batch_size=32 learning_rate=1e-3 n_layer=6`` (seed 001)
or Hugging Face ``TrainingArguments`` names (seed 004) in their fingers. Rather than answer
"unknown key", each alias is moved to its canonical path and one note per alias says where it
went, so the user learns podtrain's name the first time. Aliases are top-level keys only, in a
config file or in a ``key=value`` override; a canonical key given too wins only if it agrees.

``min_lr`` (absolute in nanoGPT) becomes ``scheduler.min_lr_ratio`` once the peak learning rate
is known, so it is resolved after every override. ``dataset=NAME`` sets two keys to different
values, as nanoGPT reads them: ``train_data = data/NAME/train.bin`` and ``val_data =
data/NAME/val.bin`` relative to the current directory, and ``model.vocab_size`` from
``data/NAME/meta.pkl`` when there is one. (nanoGPT's ``init_from`` is a podtrain key of the same
name: training/init.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from training.token_shards import TokenShardError, nanogpt_vocab


@dataclass(frozen=True)
class Alias:
    target: tuple[str, ...]  # canonical dotted paths this alias sets
    convert: Callable[[Any], Any] = lambda v: v
    origin: str = "nanoGPT"
    expand: Callable[[Any], dict[str, Any]] | None = None  # a value per path, when the paths differ (dataset)

    def values(self, value: Any) -> dict[str, Any]:
        """Each canonical path with the value the alias gives it."""
        if self.expand is not None:
            return self.expand(value)
        converted = self.convert(value)
        return {path: converted for path in self.target}


def _decay(value: Any) -> Any:
    """nanoGPT ``decay_lr``: True is its cosine decay, False a constant rate after warmup."""
    if isinstance(value, bool):
        return "cosine" if value else "constant"
    return value  # not a bool: let the schema reject it under the canonical name


def _nanogpt_dataset(value: Any) -> dict[str, Any]:
    """nanoGPT ``dataset=NAME``: ``data/NAME/{train,val}.bin``, and meta.pkl's vocabulary when present."""
    root = Path("data") / str(value)
    values: dict[str, Any] = {"train_data": str(root / "train.bin"), "val_data": str(root / "val.bin")}
    try:
        vocab = nanogpt_vocab(root)
    except TokenShardError as exc:
        raise AliasError(f"dataset={value}: {exc}") from None
    if vocab is not None:
        values["model.vocab_size"] = vocab
    return values


ALIASES: dict[str, Alias] = {
    # seed 001 (nanoGPT train.py)
    "out_dir": Alias(("checkpoint_dir",)),
    "eval_interval": Alias(("eval_every",)),
    "eval_iters": Alias(("eval_steps",)),
    "log_interval": Alias(("log_every",)),
    "block_size": Alias(("seq_len", "model.max_seq_len")),
    "learning_rate": Alias(("optimizer.lr",)),
    "max_iters": Alias(("num_steps",)),
    "warmup_iters": Alias(("scheduler.warmup_steps",)),
    "lr_decay_iters": Alias(("scheduler.total_steps",)),
    "decay_lr": Alias(("scheduler.type",), _decay),
    "compile": Alias(("compile_model",)),
    "backend": Alias(("distributed.backend",)),
    "wandb_log": Alias(("use_wandb",)),
    "n_layer": Alias(("model.num_layers",)),
    "n_head": Alias(("model.attention.n_heads",)),
    "n_embd": Alias(("model.d_model",)),
    "dropout": Alias(("model.dropout",)),
    "bias": Alias(("model.bias",)),
    "weight_decay": Alias(("optimizer.weight_decay",)),
    "beta1": Alias(("optimizer.beta1",)),
    "beta2": Alias(("optimizer.beta2",)),
    "grad_clip": Alias(("optimizer.grad_clip",)),
    "dataset": Alias(("train_data", "val_data"), expand=_nanogpt_dataset),
    # seed 004 (Hugging Face TrainingArguments names)
    "per_device_train_batch_size": Alias(("batch_size",), origin="transformers"),
    "logging_steps": Alias(("log_every",), origin="transformers"),
    "save_steps": Alias(("save_every",), origin="transformers"),
    "save_total_limit": Alias(("keep_last_n",), origin="transformers"),
    "dataloader_num_workers": Alias(("num_workers",), origin="transformers"),
    "max_steps": Alias(("num_steps",), origin="transformers"),
}

MIN_LR = "min_lr"  # absolute floor, resolved against optimizer.lr by resolve_min_lr


class AliasError(ValueError):
    """An alias clashes with its canonical key; the message names both."""


def _get(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AliasError(f"{part}: is not a section")
        node = child
    node[leaf] = value


def canonical_key(key: str, value: Any) -> dict[str, Any]:
    """The canonical paths an override key stands for, each with its value."""
    alias = ALIASES.get(key)
    return alias.values(value) if alias else {key: value}


def rename_aliases(data: dict[str, Any], source: str, notes: list[str]) -> dict[str, Any]:
    """Move every top-level alias of ``data`` to its canonical path(s), noting each move.

    ``min_lr`` stays where it is (see :func:`resolve_min_lr`).
    """
    for key in [k for k in data if k in ALIASES]:
        alias = ALIASES[key]
        raw = data.pop(key)
        for path, value in alias.values(raw).items():
            existing = _get(data, path)
            if existing is not None and existing != value:
                raise AliasError(f"{source}: {key}={raw!r} ({alias.origin} name) and {path}={existing!r} disagree; keep one")
            _set(data, path, value)
        notes.append(describe(key, raw))
    return data


def describe(key: str, value: Any) -> str:
    """The one line telling the user which canonical key an alias set."""
    alias = ALIASES[key]
    values = alias.values(value)
    if len(set(map(repr, values.values()))) == 1:
        return f"{key} ({alias.origin} name) set {' and '.join(values)} = {next(iter(values.values()))}"
    return f"{key} ({alias.origin} name) set " + ", ".join(f"{path} = {v}" for path, v in values.items())


def resolve_min_lr(data: dict[str, Any], default_lr: float, notes: list[str]) -> dict[str, Any]:
    """nanoGPT's absolute ``min_lr`` -> ``scheduler.min_lr_ratio = min_lr / optimizer.lr``."""
    if MIN_LR not in data:
        return data
    raw = data.pop(MIN_LR)
    try:  # YAML 1.1 reads 1e-4 as a string; the schema coerces such strings, so do the same here
        floor, lr = float(raw), float(_get(data, "optimizer.lr") or default_lr)
    except (TypeError, ValueError):
        raise AliasError(f"min_lr: expected a number (the absolute floor of the learning rate), got {raw!r}") from None
    if isinstance(raw, bool) or lr <= 0:
        raise AliasError(f"min_lr: expected a number (the absolute floor of the learning rate), got {raw!r}")
    ratio = floor / lr
    _set(data, "scheduler.min_lr_ratio", ratio)
    notes.append(f"min_lr (nanoGPT name) set scheduler.min_lr_ratio = {floor:g} / optimizer.lr {lr:g} = {ratio:g}")
    return data

"""``init_from``: where a new run's weights come from.

- ``scratch``: the seeded random init (the default);
- ``resume``: the same as ``--resume auto`` (continue this run's newest checkpoint, else start fresh);
- a podtrain checkpoint: a tag path (``ckpt/best``, ``ckpt/best.safetensors``) or a checkpoint
  directory (its newest tag): weights only, a new run with a fresh optimizer, schedule and step 0;
- a Hugging Face folder or hub id of the Llama or GPT-2 families (see training/hf.py).

The model config comes from the source: the training config's own ``model`` keys are laid over it
(a fine-tune may change ``dropout``), and a key that changes a shape is then reported by the weight
check as one line naming the tensor, so a vocabulary that does not fit the data is caught before a
step is taken. Only rank 0 reads the weights; :meth:`Dist.load_model_state` broadcasts them and
shards them on arrival (DDP and FSDP alike), as a resume does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch

from training import checkpoint as ckpt
from training.config import ModelConfig, TrainConfig

SCRATCH, RESUME = "scratch", "resume"


class InitError(ValueError):
    """``init_from`` names nothing usable; the message is one line naming it."""


@dataclass(frozen=True)
class Source:
    """A resolved ``init_from``: a podtrain tag (``base`` without suffix) or a Hugging Face model."""

    kind: str  # "podtrain" | "hf"
    location: str  # the tag base path, or the HF folder / hub id
    spec: str  # what the config said, for error lines

    @property
    def weights_label(self) -> str:
        return f"init_from {self.spec}" + (f" ({self.location}.safetensors)" if self.kind == "podtrain" else "")


def resolve_source(spec: str, label: str = "init_from") -> Source:
    """Decide what ``spec`` names without reading any weights; ``label`` starts error lines (the key or argument)."""
    path = Path(spec)
    if not path.is_dir() or path.name.endswith(ckpt.DCP_SUFFIX):
        path = ckpt.tag_path(spec)  # ckpt/best.safetensors, a sharded folder, seed 004's ckpt/latest.pt or checkpoint-1000.pt
    sharded = path if path.name.endswith(ckpt.DCP_SUFFIX) else Path(f"{path}{ckpt.DCP_SUFFIX}")
    if sharded.is_dir() and not Path(f"{path}.safetensors").is_file():
        raise InitError(f"{label} {spec}: a sharded (FSDP) tag; turn it into one file first: python -m training.consolidate {sharded}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source("hf", str(path), spec)
        listed = ckpt.list_tags(path)
        if listed and (path / f"{listed[0][1]}{ckpt.DCP_SUFFIX}").is_dir() and not (path / f"{listed[0][1]}.config.json").is_file():
            newest = path / f"{listed[0][1]}{ckpt.DCP_SUFFIX}"
            raise InitError(f"{label} {spec}: the newest tag is sharded (FSDP); turn it into one file first: "
                            f"python -m training.consolidate {newest}")
        tags = [tag for _, tag in listed if (path / f"{tag}.config.json").is_file()]
        if not tags:
            raise InitError(f"{label} {spec}: a directory with neither podtrain checkpoints (<tag>.safetensors + "
                            f"<tag>.config.json) nor a Hugging Face config.json")
        return Source("podtrain", str(path / tags[0]), spec)
    if Path(f"{path}.safetensors").is_file():
        if not Path(f"{path}.config.json").is_file():
            raise InitError(f"{label} {spec}: {path}.config.json is missing (the model config of that checkpoint)")
        return Source("podtrain", str(path), spec)
    if spec.startswith((".", "/", "~")) or spec.endswith((*ckpt.SUFFIXES, ".pt")) or (path.parent != Path(".") and path.parent.exists()):
        raise InitError(f"{label} {spec}: no such checkpoint or folder")
    return Source("hf", spec, spec)  # a hub id: transformers reports it when it cannot be fetched


def source_model_config(source: Source) -> tuple[dict[str, Any], str | None]:
    """(the ``model`` section the source was trained with, its tokenizer location or None)."""
    if source.kind == "hf":
        from training.hf import hf_to_model_config

        return hf_to_model_config(source.location, source.spec)
    config_path = Path(f"{source.location}.config.json")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InitError(f"init_from {source.spec}: {config_path}: unreadable config ({exc})") from None
    if not isinstance(data.get("model"), dict):
        raise InitError(f"init_from {source.spec}: {config_path}: has no model section")
    return data["model"], data.get("tokenizer_path")


def _lay_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _lay_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the model (and, when unset, the tokenizer) of its ``init_from`` source.

    Idempotent: once resolved, every model key is explicit and laying it over the source changes nothing.
    """
    if cfg.init_from in (SCRATCH, RESUME):
        return cfg
    source = resolve_source(cfg.init_from)
    model, tokenizer = source_model_config(source)
    merged = _lay_over(model, cfg.model.model_dump(mode="json", exclude_unset=True))
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["model"] = ModelConfig.model_validate(merged).model_dump(mode="json")
    if cfg.tokenizer_path is None and tokenizer is not None:
        data["tokenizer_path"] = tokenizer
    try:
        return TrainConfig.model_validate(data)
    except ValueError as exc:
        raise InitError(f"init_from {cfg.init_from}: the training config does not fit its model: {exc}") from None


def read_weights(source: Source, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The source's weights under podtrain's names (rank 0 only: the others receive a broadcast)."""
    if source.kind == "hf":
        from training.hf import load_hf_weights

        return load_hf_weights(source.location, cfg, source.spec)
    path = f"{source.location}.safetensors"
    try:
        with safetensors.safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncation
        raise InitError(f"init_from {source.spec}: {path}: unreadable weights ({exc})") from None


def load_initial_weights(cfg: TrainConfig, net: torch.nn.Module, dist: Any, info) -> None:
    """Fill ``net`` with the ``init_from`` weights: read on rank 0, checked and broadcast by ``dist``."""
    if cfg.init_from in (SCRATCH, RESUME):
        return
    source = resolve_source(cfg.init_from)
    weights, error = None, None
    if dist.is_main:
        try:
            weights = read_weights(source, cfg.model)
        except ValueError as exc:  # InitError, HFError: raised on every rank below, not on rank 0 alone (a hang)
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise InitError(error)
    dist.load_model_state(net, weights, cfg.model.tie_embeddings, source=source.weights_label)
    del weights
    info(f"init_from {cfg.init_from}: weights loaded ({source.kind} {source.location}); fresh optimizer and schedule")

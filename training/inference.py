"""Open a podtrain checkpoint for use: the model in eval mode, its training config, its tokenizer.

``evaluate``, ``sample`` and ``export`` all start here, and accept the same spellings of a
checkpoint as ``init_from``: a tag path (``ckpt/best``, ``ckpt/best.safetensors``) or a checkpoint
directory (its newest tag). Only the weights and the config are read, never the optimizer state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.config import ConfigError, TrainConfig, validate_config
from training.init import InitError, resolve_source
from training.model import Transformer


@dataclass
class Checkpoint:
    model: Transformer
    config: TrainConfig
    raw_config: dict  # the config.json as written (what an export copies from)
    base: Path  # the tag path without suffix

    @property
    def weights_path(self) -> Path:
        return Path(f"{self.base}.safetensors")


def find_checkpoint(spec: str) -> tuple[Path, dict]:
    """(tag base path, config dict) of ``spec``, or one line naming what is missing."""
    source = resolve_source(spec, "checkpoint")
    if source.kind != "podtrain":
        if not Path(spec).is_dir():
            raise InitError(f"checkpoint {spec}: no such checkpoint")
        raise InitError(f"checkpoint {spec}: a Hugging Face folder, not a podtrain checkpoint (<tag>.safetensors + <tag>.config.json)")
    config_path = Path(f"{source.location}.config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InitError(f"checkpoint {spec}: {config_path}: unreadable config ({exc})") from None
    return Path(source.location), raw


def load_checkpoint(spec: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Build the model of ``spec``'s config and load its weights (float32, eval mode)."""
    base, raw = find_checkpoint(spec)
    try:
        cfg = validate_config(raw, f"{base}.config.json")
    except ConfigError as exc:
        raise InitError(f"checkpoint {spec}: {exc}") from None
    model = Transformer(cfg.model)
    try:
        weights = load_file(f"{base}.safetensors")
    except Exception as exc:  # SafetensorError for a truncated or foreign file (not an OSError or ValueError)
        raise InitError(f"checkpoint {spec}: {base}.safetensors: unreadable weights ({' '.join(str(exc).split())[:200]})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: torch lists them all on several lines
        first = " ".join(str(exc).split())[:300]
        raise InitError(f"checkpoint {spec}: {base}.safetensors does not match its config: {first}") from None
    return Checkpoint(model.to(device).eval(), cfg, raw, base)


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU (inference on MPS is left to an explicit ``mps``)."""
    return torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else ("cpu" if spec == "auto" else spec))


def load_tokenizer(cfg: TrainConfig, override: str | None = None):
    """The ``tokenizers.Tokenizer`` of the run (``tokenizer_path``: a bundle or HF folder, or a tokenizer.json)."""
    from tokenizers import Tokenizer

    where = override or cfg.tokenizer_path
    if not where:
        raise InitError("the checkpoint config has no tokenizer_path: pass --tokenizer PATH (a tokenizer.json or its folder)")
    path = Path(where)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises a bare Exception
        raise InitError(f"tokenizer {path}: cannot load ({' '.join(str(exc).split())[:200]})") from None

"""Load a checkpoint and sample text from it: the quickest check that a run learned something."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.config import validate_config
from training.model import Transformer


def load_model(checkpoint_dir: str | Path, tag: str = "final") -> Transformer:
    """Build the model from ``<tag>.config.json`` and load ``<tag>.safetensors`` (CPU, eval mode)."""
    base = Path(checkpoint_dir) / tag
    cfg = validate_config(json.loads(Path(f"{base}.config.json").read_text(encoding="utf-8")), f"{base}.config.json")
    model = Transformer(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(f"{base}.safetensors"), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set()):
        raise ValueError(f"{base}.safetensors: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def sample_text(model: Transformer, tokenizer_json: str | Path, prompt: str, max_new_tokens: int = 60,
                temperature: float = 0.8, seed: int = 0) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids], dtype=torch.long)
    out = model.generate(ids, max_new_tokens, temperature=temperature)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)

"""Perplexity filtering (seed 004): score every document with a reference model once, keep the
scores in side files, then drop by a threshold or a percentile that can change without rescoring.

The reference model is a podtrain checkpoint (loaded with training/inference.py's ``load_checkpoint``, its
tokenizer.json beside it) or, when ``kenlm_model`` is given and the ``kenlm`` package is
importable, a KenLM model (the CCNet/FineWeb-style choice). Scores are per input shard:
``<scores>/<shard>.npy``, one float64 perplexity per line, written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from sharder.errors import ShardError
from training.atomic import atomic_write_bytes


class _CheckpointScorer:
    """Per-document perplexity under a podtrain checkpoint: exp(mean next-token loss) of its first tokens."""

    def __init__(self, checkpoint: str, tag: str, tokenizer: str, max_tokens: int) -> None:
        import torch
        from tokenizers import Tokenizer

        from training.evaluate import perplexity
        from training.inference import load_checkpoint

        self.torch = torch
        self.perplexity = perplexity  # exp(loss), inf past float range (imported here: torch only when scoring)
        self.model = load_checkpoint(str(Path(checkpoint) / tag)).model
        self.tokenizer = Tokenizer.from_file(tokenizer)
        self.max_tokens = min(max_tokens, self.model.cfg.max_seq_len + 1)

    def __call__(self, text: str) -> float:
        ids = self.tokenizer.encode(text).ids[: self.max_tokens]
        if len(ids) < 2:
            return math.inf
        x = self.torch.tensor([ids[:-1]])
        y = self.torch.tensor([ids[1:]])
        with self.torch.no_grad():
            _, loss = self.model(x, y)
        return self.perplexity(loss.item())


class _KenlmScorer:
    def __init__(self, model_file: str) -> None:
        import kenlm

        self.model = kenlm.Model(model_file)

    def __call__(self, text: str) -> float:
        return float(self.model.perplexity(" ".join(text.split())))


def check_model(config: Any) -> None:
    """Fail before any work when the reference model cannot be used."""
    if config.kenlm_model is not None:
        try:
            import kenlm  # noqa: F401
        except ImportError:
            raise ShardError("data.curate.perplexity.kenlm_model: the kenlm package is not installed "
                             "(pip install 'podtrain[kenlm]')") from None
        if not Path(config.kenlm_model).is_file():
            raise ShardError(f"data.curate.perplexity.kenlm_model {config.kenlm_model}: no such file")
        return
    if not Path(f"{Path(config.checkpoint) / config.tag}.safetensors").is_file():
        raise ShardError(f"data.curate.perplexity.checkpoint {config.checkpoint}: no {config.tag}.safetensors there")
    if not Path(config.tokenizer).is_file():
        raise ShardError(f"data.curate.perplexity.tokenizer {config.tokenizer}: no such file")


class PerplexityScorer(PipelineStep):
    """Consumes documents, writes ``<scores_dir>/<shard>.npy``; forwards nothing."""

    name = "perplexity scores"
    type = "🔢 - STATS"

    def __init__(self, config: Any, scores_dir: str) -> None:
        super().__init__()
        self.config = config
        self.scores_dir = scores_dir

    def _scorer(self):
        c = self.config
        if c.kenlm_model is not None:
            return _KenlmScorer(c.kenlm_model)
        return _CheckpointScorer(c.checkpoint, c.tag, c.tokenizer, c.max_tokens)

    def _save(self, shard: str, scores: list[float]) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(scores, dtype=np.float64))
        atomic_write_bytes(Path(self.scores_dir) / f"{shard}.npy", buffer.getvalue())

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        score = self._scorer()
        current, scores = None, []
        for doc in data:
            shard = doc.metadata["shard"]
            if shard != current and current is not None:
                self._save(current, scores)
                scores = []
            current = shard
            scores.append(score(doc.text))
            self.stat_update("scored")
        if current is not None:
            self._save(current, scores)
        return
        yield


def load_scores(scores_dir: Path) -> dict[str, np.ndarray]:
    return {p.name[: -len(".npy")]: np.load(p) for p in sorted(scores_dir.glob("*.npy"))}


def threshold(config: Any, scores: dict[str, np.ndarray]) -> float:
    """The perplexity above which documents are dropped."""
    if config.max_perplexity is not None:
        return float(config.max_perplexity)
    every = np.concatenate(list(scores.values())) if scores else np.zeros(0)
    finite = every[np.isfinite(every)]
    return float(np.percentile(finite, 100.0 - config.drop_percentile)) if len(finite) else math.inf


class PerplexityFilter(PipelineStep):
    """Drops documents whose side-file perplexity is above ``limit``."""

    name = "perplexity filter"
    type = "🔻 - FILTER"

    def __init__(self, scores_dir: str, limit: float) -> None:
        super().__init__()
        self.scores_dir = scores_dir
        self.limit = limit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        current, scores = None, None
        for doc in data:
            shard, line = doc.id.rsplit("/", 1)
            if shard != current:
                current, scores = shard, np.load(Path(self.scores_dir) / f"{shard}.npy")
            self.stat_update("total")
            if scores[int(line)] > self.limit:
                self.stat_update("dropped")
                continue
            yield doc

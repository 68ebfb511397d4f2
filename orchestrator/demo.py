"""``make demo``: the whole pipeline, local mode, on the CPU, on the embedded corpus, in minutes.

Builds ~6 MB of real text from the standard library (no network), then runs
``orchestrate --mode local`` on it with ``configs/demo.yaml``: shard, train a BPE tokenizer, encode,
emit training.yaml/.toml, train, and finally print where the checkpoints and TensorBoard logs are and
a few lines sampled from the model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

from orchestrator.demo_corpus import CORPUS_VERSION, build_corpus
from orchestrator.pipeline import Pipeline, PipelineError, PipelineOptions
from orchestrator.stages import StageFailed, summary_table
from training.sample import load_model, sample_text

PROMPTS = ["The function returns", "import os\n", "Return a new"]


def main(workspace: Path = Path("workspace")) -> int:
    console = Console(highlight=False, soft_wrap=True)
    start = time.monotonic()
    corpus = workspace / "raw" / f"stdlib-corpus-v{CORPUS_VERSION}.jsonl"
    if not corpus.exists():
        docs, size = build_corpus(corpus)
        console.print(f"demo: built {corpus} ({docs:,} documents, {size / 1e6:.1f} MB of standard-library text)", markup=False)
    opts = PipelineOptions(mode="local", inputs=[str(corpus)], experiment="demo", train_shard_lines=2000,
                           config="configs/demo.yaml", workspace=workspace, val_ratio=0.05, nproc=1,
                           tokenizer_sample_bytes=50_000_000)
    try:
        pipe = Pipeline(opts, console)
        records = pipe.run()
    except (PipelineError, StageFailed) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    console.print(summary_table(records, "demo pipeline"))
    ckpt = pipe.layout.run / "checkpoints"
    console.print(f"checkpoints:  {ckpt}", markup=False)
    console.print(f"tensorboard:  tensorboard --logdir {pipe.layout.run / 'tensorboard'}", markup=False)
    console.print(f"config:       {pipe.layout.run / 'training.yaml'} (and training.toml)", markup=False)
    model = load_model(ckpt, "final")
    console.print("samples from the model (temperature 0.8):", markup=False)
    for prompt in PROMPTS:
        text = sample_text(model, pipe.layout.tokenizer / "tokenizer.json", prompt)
        console.print("  > " + text.replace("\n", "\n    "), markup=False)
    console.print(f"demo finished in {time.monotonic() - start:.0f}s", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

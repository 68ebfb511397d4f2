"""``make demo``: the whole pipeline, local mode, on the CPU, on the embedded corpus, in minutes.

Builds ~6 MB of real text from the standard library (no network), then runs
``orchestrate --mode local`` on it with ``configs/demo.yaml``: shard, train a BPE tokenizer, encode,
emit training.yaml/.toml, train, and finally print where the checkpoints and TensorBoard logs are,
a few lines sampled from the model, and check that its Hugging Face export loads in ``transformers``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

from orchestrator.demo_corpus import CORPUS_VERSION, build_corpus
from orchestrator.pipeline import Pipeline, PipelineError, PipelineOptions
from orchestrator.stages import StageFailed, summary_table
from training.generate import SamplingParams, generate
from training.hf import check_export, export
from training.inference import load_checkpoint, load_tokenizer

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
    ck = load_checkpoint(str(ckpt / "final"))
    tok = load_tokenizer(ck.config)
    eot = tok.token_to_id("<|endoftext|>")
    console.print("samples from the model (temperature 0.8, KV cache):", markup=False)
    for i, prompt in enumerate(PROMPTS):
        ids = generate(ck.model, tok.encode(prompt).ids, SamplingParams(60, 0.8, seed=i, eos_id=eot))
        console.print("  > " + (prompt + tok.decode(ids)).replace("\n", "\n    "), markup=False)
    hf_dir = pipe.layout.run / "hf"
    export(ck.weights_path, ck.raw_config, hf_dir, overwrite=True)
    arch, diff = check_export(hf_dir, ck.model, tok.encode(PROMPTS[0]).ids)
    console.print(f"hf export:    {hf_dir} loads as {arch} in transformers (logits max abs diff {diff:.1e}); "
                  f"orchestrate evaluate|sample|export {ckpt / 'final'} (docs/evaluate.md)", markup=False)
    console.print(f"demo finished in {time.monotonic() - start:.0f}s", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

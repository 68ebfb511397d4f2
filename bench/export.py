"""Peak host memory of ``export --to hf``: streamed tensor by tensor, against loading the whole checkpoint.

    python bench/export.py [--config configs/runpod_1b.yaml] [--workdir /tmp/podtrain-export-bench]

Writes a checkpoint of the config's model with random float32 weights (streamed, so the bench
itself never holds the model), then in a fresh process each: podtrain's ``training.hf.export``
and the baseline, the obvious way (``safetensors.torch.load_file`` of the whole checkpoint, map
the names, ``save_file``). Peak RSS (VmHWM) of each process, in GB and in copies of the weights,
beside the seconds and MB/s. Writes bench/results/export.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize (imported by inspect, which torch imports): drop it first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import shutil
import subprocess
import time

import torch
from rich.console import Console
from rich.table import Table

from training.checkpoint import LazyTensor, write_safetensors
from training.config import load_config
from training.model import build_meta_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "export.json"

CHILD = r"""
import json, re, sys, time
from pathlib import Path
mode, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
config = json.loads(Path(str(ckpt) + ".config.json").read_text())
t0 = time.perf_counter()
if mode == "streamed":
    from training.hf import export
    export(Path(str(ckpt) + ".safetensors"), config, out, overwrite=True)
else:
    from safetensors.torch import load_file, save_file
    from training.config import ModelConfig
    from training.hf import mapping
    weights = load_file(str(ckpt) + ".safetensors")
    cfg = ModelConfig.model_validate(config["model"])
    hf = {name: to_hf([weights["embed_tokens.weight" if n == "lm_head.weight" and n not in weights else n] for n in names])
          for name, names, _, to_hf in mapping(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
seconds = time.perf_counter() - t0
peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
"""


def write_checkpoint(config_path: str, base: Path) -> int:
    """A ``<base>.safetensors`` + ``.config.json`` of random weights, one tensor in memory at a time."""
    cfg = load_config(config_path, ["train_data=unused"])
    model = build_meta_model(cfg.model)
    tied = cfg.model.tie_embeddings
    entries = {name: LazyTensor(list(p.shape), torch.float32, lambda s=tuple(p.shape): torch.randn(s) * 0.02)
               for name, p in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    write_safetensors(f"{base}.safetensors", entries, {"format": "podtrain-checkpoint-1", "step": "0"})
    plain = cfg.to_plain()
    plain.pop("tokenizer_path", None)  # a pod path: the bench measures the weights, not the tokenizer
    Path(f"{base}.config.json").write_text(json.dumps(plain))
    return sum(e.nbytes for e in entries.values())


def child_baseline_mb() -> float:
    """Peak RSS of a process that only imports what the export imports (torch, transformers' config)."""
    code = "import re, torch, safetensors, training.hf; print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/runpod_1b.yaml")
    parser.add_argument("--workdir", default="/tmp/podtrain-export-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "final"
    weight_bytes = write_checkpoint(args.config, base)
    imports = child_baseline_mb()
    rows = []
    try:
        for mode in ("baseline", "streamed"):
            out = work / f"hf_{mode}"
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(base), str(out)], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode:
                sys.exit(f"{mode} export failed: {proc.stderr.strip().splitlines()[-1]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"mode": mode, **result, "weights_bytes": weight_bytes, "imports_bytes": imports,
                         "copies": (result["peak_bytes"] - imports) / weight_bytes})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        for suffix in (".safetensors", ".config.json"):
            Path(f"{base}{suffix}").unlink(missing_ok=True)
    table = Table(title=f"export of {args.config} ({weight_bytes / 1e9:.2f} GB of float32 weights)")
    for col in ("path", "seconds", "MB/s", "peak RSS GB", "copies of the weights (above imports)"):
        table.add_column(col, justify="right")
    for r in rows:
        name = "load_file + save_file (baseline)" if r["mode"] == "baseline" else "training.hf.export (streamed)"
        table.add_row(name, f"{r['seconds']:.1f}", f"{weight_bytes / 1e6 / r['seconds']:,.0f}", f"{r['peak_bytes'] / 1e9:.2f}", f"{r['copies']:.2f}")
    Console(highlight=False).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": args.config, "baseline": "load_file + save_file", "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

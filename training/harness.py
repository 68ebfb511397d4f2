"""``evaluate --harness TASKS``: EleutherAI's lm-evaluation-harness on the checkpoint's HF export.

The checkpoint is exported (training/hf.py) into a temporary folder beside it, and the harness runs
its own ``hf`` model on that folder, exactly as ``lm_eval --model hf --model_args pretrained=DIR``
would: the scores are the harness's, not a re-implementation. ``lm-eval`` is an optional extra
(``pip install -e '.[eval]'``); ``--harness-include`` adds a folder of task YAMLs (a local task
over a local jsonl works offline).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from training.hf import export


def run_harness(ck, tasks: str, limit: int | None, include_path: str | None, device: str, console: Console) -> dict[str, Any]:
    """Scores per task and metric (the harness's ``results``), printed as a table."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--harness: lm-eval is not installed; pip install -e '.[eval]'")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--harness-include {include_path}: not a folder of task YAMLs")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--harness {unknown[0]}: no such lm-eval task (see `lm_eval ls tasks`, or --harness-include FOLDER)")
    with tempfile.TemporaryDirectory(prefix=f".harness_{ck.base.name}_", dir=ck.base.parent) as tmp:
        folder = Path(tmp) / "hf"
        export(ck.weights_path, ck.raw_config, folder)
        out = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=names, limit=limit,
                              device=device, batch_size=1, task_manager=manager, log_samples=False)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
               for task, metrics in out["results"].items()}
    table = Table(title="lm-evaluation-harness")
    for col in ("task", "metric", "value"):
        table.add_column(col)
    for task, metrics in results.items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    console.print(table)
    return results

"""Seed 000's one command: ``train PRESET.json`` prepares the preset's ``data:`` before training.

The preset's ``data:`` section is a data recipe (``sharder.recipe``), and its ``name`` the
experiment, so the data stages are exactly ``orchestrate --data PRESET.json --experiment NAME
--stop-after tokenizer`` in local mode: shard (then curate, when the recipe curates), train or reuse
the tokenizer, encode. Each stage is skipped when its marker says it is done with the same inputs.
The token shards land where the trainer reads a seed 000 preset's data
(``workspace/cache/<name>/tokens/{train,val}``, ``training.presets.from_seed000``).

Token shards already in that folder without a pipeline marker were put there by hand (or by an
earlier podtrain): they are used as they are, and one line says so.

``training.cli`` calls this lazily, on rank 0 only (``training.presets.prepare_for_all_ranks``).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from orchestrator.pipeline import USER_ERRORS, Pipeline, PipelineOptions, token_shard_report
from orchestrator.stages import StageFailed, read_marker
from orchestrator.workspace import Layout
from training.presets import PresetError

LOCAL_WORKSPACE = Path("workspace")  # where from_seed000 reads: relative to the current directory


def prepare_preset_data(preset: str | Path, console: Console) -> None:
    """Run the data stages of ``preset`` (layout, shard, tokenizer) for its experiment; errors are PresetErrors."""
    preset = Path(preset)
    name = str(json.loads(preset.read_text(encoding="utf-8")).get("name") or preset.stem)
    layout = Layout.for_mode("local", name, LOCAL_WORKSPACE)
    if token_shard_report(layout.train_tokens)[0] > 0 and read_marker(layout.stages, "tokenizer") is None:
        console.print(f"[data] {preset}: using the token shards already in {layout.train_tokens} "
                      "(not made by this pipeline; remove them to prepare data.sources)", markup=False)
        return
    console.print(f"[data] {preset}: preparing data.sources for experiment {name!r} (shard, tokenizer, encode)", markup=False)
    opts = PipelineOptions(mode="local", data=str(preset), experiment=name, config=str(preset), workspace=LOCAL_WORKSPACE,
                           stop_after="tokenizer")
    try:
        Pipeline(opts, console).run()
    except (StageFailed, *USER_ERRORS) as exc:
        raise PresetError(f"{preset}: data: {exc}") from None

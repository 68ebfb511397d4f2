"""Seed 004's checkpoint habits: a checkpoint at the end of each epoch, a ``latest`` tag, ``--resume
checkpoint-1000.pt`` / ``latest.pt`` / ``step1000``, and ``save_total_limit``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import stdlib_documents, tiny_config, write_byte_shards
from training import checkpoint as ckpt
from training.cli import app
from training.config import validate_config
from training.data import TokenStream, resolve_shards
from training.trainer import train


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """~4 kB of byte tokens: an epoch of 64-token windows is under ten steps of 8 rows."""
    root = tmp_path_factory.mktemp("small")
    docs = [doc[:2000] for doc in stdlib_documents(40_000)][:2]
    write_byte_shards(root / "train", docs, 2)
    write_byte_shards(root / "val", docs[:1], 1)
    return {"train": root / "train", "val": root / "val"}


def _steps_per_epoch(corpus: dict[str, Path], batch: int, seq_len: int) -> int:
    stream = TokenStream(resolve_shards(str(corpus["train"])), 42, 257)
    windows = sum(len(stream.windows(0, i, seq_len)) for i in range(len(stream.order(0))))
    return -(-windows // batch)


def test_tag_names_of_other_projects_map_to_podtrain_tags() -> None:
    assert ckpt.tag_path("ckpt/checkpoint-1000.pt") == Path("ckpt/step0001000")
    assert ckpt.tag_path("ckpt/latest.pt") == Path("ckpt/latest")
    assert ckpt.tag_path("step1000") == Path("step0001000")
    assert ckpt.tag_path("1000") == Path("step0001000")
    assert ckpt.tag_path("ckpt/step0001000.safetensors") == Path("ckpt/step0001000")
    assert ckpt.tag_path("ckpt/best.state.pt") == Path("ckpt/best")
    assert ckpt.tag_path("gpt2") == Path("gpt2")  # a hub id stays one


def test_epoch_checkpoints_latest_tag_and_save_total_limit(small_corpus, tmp_path: Path) -> None:
    per_epoch = _steps_per_epoch(small_corpus, 8, 64)
    assert 4 < per_epoch < 20, per_epoch  # the corpus is sized so two epochs fit in a short run
    num_steps = 2 * per_epoch + 3
    cfg = tiny_config(small_corpus, tmp_path, num_steps=num_steps, save_every=1000, eval_every=1000)
    out = io.StringIO()
    result = train(validate_config({**cfg, "save_every_epoch": True, "save_total_limit": 1}),
                   console=Console(file=out, width=200))
    assert result.exit_code == 0
    said = [line for line in out.getvalue().splitlines() if line.endswith("(save_every_epoch)")]
    assert [line.split(": epoch ")[1].split(" ")[0] for line in said] == ["1", "2"], out.getvalue()
    directory = Path(result.checkpoint_dir)
    tags = {tag: step for step, tag in ckpt.list_tags(directory)}
    # the second epoch ends at the step holding its last window (a step's rows may straddle the boundary);
    # save_total_limit=1 (transformers' name of keep_last_n) keeps only the newest step tag
    step_tags = sorted(step for tag, step in tags.items() if tag.startswith("step"))
    assert len(step_tags) == 1 and 2 * per_epoch - 2 <= step_tags[0] <= 2 * per_epoch, (tags, per_epoch)
    assert tags["latest"] == tags["final"] == num_steps
    latest, final = directory / "latest.safetensors", directory / "final.safetensors"
    assert os.path.samefile(latest, final)  # a link, not a second write


def test_resume_by_seed_004_names(small_corpus, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(small_corpus, tmp_path, num_steps=6, save_every=3, eval_every=1000, keep_last_n=5)))
    runner = CliRunner()
    first = runner.invoke(app, [str(path)])
    assert first.exit_code == 0, first.output
    ckpt_dir = tmp_path / "ckpt"
    for spec, step in ((f"{ckpt_dir}/checkpoint-3.pt", 3), (f"{ckpt_dir}/latest.pt", 6), ("step3", 3), ("3", 3)):
        again = runner.invoke(app, [str(path), "num_steps=7", "--resume", spec])
        assert again.exit_code == 0, (spec, again.output)
        assert f"at step {step}" in again.output, (spec, again.output)
        for tag in ("final", "latest", "step0000007"):  # the resumed run's own saves: undo them for the next spec
            for suffix in ckpt.SUFFIXES:
                (ckpt_dir / f"{tag}{suffix}").unlink(missing_ok=True)
        for suffix in ckpt.SUFFIXES:
            os.link(ckpt_dir / f"step0000006{suffix}", ckpt_dir / f"latest{suffix}")
    missing = runner.invoke(app, [str(path), "--resume", f"{ckpt_dir}/checkpoint-4.pt"])
    assert missing.exit_code == 2
    assert f"--resume {ckpt_dir}/checkpoint-4.pt: no such checkpoint" in missing.output

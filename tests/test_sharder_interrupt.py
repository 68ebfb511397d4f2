"""fineweb-sharder stopped the hard ways, as a real CLI process: SIGKILL mid-shard, SIGINT, SIGTERM and a
full disk. Each time the directory stays consistent and re-running the same command ends with exactly
the shards of an uninterrupted run."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sharder import ROOT, assert_consistent, concatenated, documents, run, write_parquet

from sharder.manifest import MANIFEST_NAME, load_manifest


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> str:
    """~9 MB of text in three parquet files: long enough to be stopped mid-run after its first shards."""
    directory = tmp_path_factory.mktemp("big")
    write_parquet(directory, documents(8_000, seed=11, mean_lines=30), files=3, row_group_size=500)
    return str(directory / "*.parquet")


def _options(big_input: str, out: Path, mode: str = "prod", gzip: bool = False) -> dict:
    split = {"val_ratio": 0.2} if mode == "split" else {}
    return dict(mode=mode, input=[big_input], lines_per_shard=400, output_dir=out, gzip=gzip, **split)


def _args(options: dict) -> list[str]:
    """The CLI line for ``options`` (the in-process run_shard keywords)."""
    args = ["--mode", options["mode"], "--input", options["input"][0], "--output-dir", str(options["output_dir"]),
            "--lines-per-shard", str(options["lines_per_shard"])]
    if options["gzip"]:
        args.append("--gzip")
    if "val_ratio" in options:
        args += ["--val-ratio", str(options["val_ratio"])]
    return args


@pytest.fixture(scope="module")
def reference(tmp_path_factory, big_input):
    """Uninterrupted runs, one per (mode, gzip), made on first use."""
    made: dict[tuple[str, bool], Path] = {}

    def get(mode: str = "prod", gzip: bool = False) -> Path:
        if (mode, gzip) not in made:
            out = tmp_path_factory.mktemp(f"reference-{mode}-{gzip}")
            run(**_options(big_input, out, mode, gzip))
            made[mode, gzip] = out
        return made[mode, gzip]

    return get


def _start(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sharder", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _when_exists(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path.name}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.002)


@pytest.mark.parametrize("mode", ["prod", "split"])
def test_sigkill_mid_shard_then_rerun_equals_an_uninterrupted_run(tmp_path, big_input, reference, mode):
    options = _options(big_input, tmp_path, mode, gzip=True)
    sides = ("train", "val") if mode == "split" else ("",)
    proc = _start(_args(options))
    # shard 1 exists only once shard 0 is in the manifest: the kill lands while a later shard is open
    _when_exists(tmp_path / sides[0] / "shard_00001.txt.gz", proc)
    time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first = load_manifest(tmp_path / sides[0])
    assert first.shards and not first.complete  # stopped mid-run, with work to resume from
    if mode == "split":  # train and val stopped at different documents: the resume must reconcile them
        val = tmp_path / "val"
        val_position = load_manifest(val).resume["documents"] if (val / MANIFEST_NAME).exists() else 0
        assert val_position != first.resume["documents"]

    result = run(**options)  # the same command again
    assert result.splits[sides[0] or "train"].resumed
    for side in sides:
        assert_consistent(tmp_path / side)
        assert not list((tmp_path / side).glob(".tmp-*"))
        assert concatenated(tmp_path / side) == concatenated(reference(mode, True) / side)
        resumed, expected = load_manifest(tmp_path / side), load_manifest(reference(mode, True) / side)
        assert [(s.name, s.lines, s.sha256) for s in resumed.shards] == [
            (s.name, s.lines, s.sha256) for s in expected.shards]
        assert resumed.complete and resumed.resume["documents"] == expected.resume["documents"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_sigterm_close_the_shard_exit_with_the_signal_code_and_resume(tmp_path, big_input, reference,
                                                                            signum, code):
    options = _options(big_input, tmp_path)
    proc = _start(_args(options))
    _when_exists(tmp_path / "shard_00000.txt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert_consistent(tmp_path)
    manifest = load_manifest(tmp_path)
    assert not manifest.complete and not list(tmp_path.glob(".tmp-*"))
    assert manifest.resume["documents"] >= manifest.total_lines > 0

    run(**options)
    assert_consistent(tmp_path)
    assert concatenated(tmp_path) == concatenated(reference())


def test_full_disk_is_one_line_and_nothing_torn_then_resumes(tmp_path, big_input, reference):
    options = _options(big_input, tmp_path)

    def small_disk() -> None:  # every file the process writes is capped at 200 kB: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = _start(_args(options), preexec_fn=small_disk)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and f"error: {tmp_path}: cannot write: File too large" in err
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("shard_*"))
    assert load_manifest(tmp_path).total_lines == 0

    run(**options)
    assert concatenated(tmp_path) == concatenated(reference())

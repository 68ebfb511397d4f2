"""Sharded asynchronous checkpoints of FSDP runs (training/sharded_checkpoint.py), on CPU/gloo.

A step tag of an FSDP run is a DCP folder with one file per rank; it resumes on another world size
(2 -> 1, 1 -> 2) on the loss curve of one process; ``final`` stays the single file; a SIGKILL while
an asynchronous write is in flight leaves the previous tag whole and the resumed run on the same curve;
``python -m training.consolidate`` gives the single-file format, equal to what one process saved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from test_distributed import assert_close, losses
from training import checkpoint as ckpt
from training.config import validate_config
from training.trainer import train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GLOBAL_BATCH = 8


def config(corpus, out: Path, strategy: str, world: int, **overrides) -> dict:
    settings = dict(batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=1, num_steps=6, eval_every=3,
                    save_every=3, keep_last_n=10, scheduler__total_steps=400)
    cfg = tiny_config(corpus, out, **{**settings, **overrides})
    cfg["distributed"] = {"strategy": strategy, "timeout_s": 60}
    return cfg


def launch(cfg: dict, out: Path, world: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"run{world}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [*TORCHRUN, f"--nproc_per_node={world}", "-m", "training", str(path), *args]
    proc = subprocess.run(cmd, cwd=out, env=env or ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """One plain process, 9 steps of the global batch: its checkpoints are in the single-file format."""
    out = tmp_path_factory.mktemp("reference")
    result = train(validate_config(config(byte_corpus, out, "none", 1, num_steps=9)))
    return out / "ckpt", result.losses


@pytest.fixture(scope="module")
def one_rank_fsdp(byte_corpus, tmp_path_factory) -> Path:
    """An FSDP run on one rank (in this process): its step 3 is a sharded tag."""
    out = tmp_path_factory.mktemp("fsdp1")
    train(validate_config(config(byte_corpus, out, "fsdp", 1)))
    return out


def test_an_fsdp_tag_is_a_dcp_folder_and_final_the_single_file(one_rank_fsdp) -> None:
    directory = one_rank_fsdp / "ckpt"
    folder = directory / "step0000003.dcp"
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "podtrain.json", "state.pt", "config.json"}
    assert not (directory / "step0000003.safetensors").exists()
    assert (directory / "final.safetensors").is_file() and (directory / "final.state.pt").is_file()
    # best was a DCP folder at step 3 (linked to step 3); at step 6 it became a link to the single-file final
    assert os.path.samefile(directory / "best.safetensors", directory / "final.safetensors")
    assert not (directory / "best.dcp").exists()
    assert ckpt.list_tags(directory) == [(6, "best"), (6, "final"), (6, "latest"), (3, "step0000003")]
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]


def test_a_sharded_tag_resumes_in_one_plain_process_on_the_same_curve(byte_corpus, one_rank_fsdp, reference, tmp_path) -> None:
    out = tmp_path / "resumed"
    cfg = config(byte_corpus, out, "none", 1, num_steps=9)
    result = train(validate_config(cfg), resume=str(one_rank_fsdp / "ckpt" / "step0000003.dcp"))
    assert_close(result.losses, reference[1], range(4, 10))


def test_consolidate_gives_what_one_process_saved(one_rank_fsdp, reference, tmp_path) -> None:
    out = tmp_path / "cons" / "step0000003"
    proc = subprocess.run([sys.executable, "-m", "training.consolidate", str(one_rank_fsdp / "ckpt" / "step0000003.dcp"),
                           "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "consolidated" in proc.stdout and "step 3" in proc.stdout
    mine, theirs = ckpt.load_tag(out.parent, out.name), ckpt.load_tag(reference[0], "step0000003")
    assert mine.step == 3 and mine.weights.keys() == theirs.weights.keys()
    for name, tensor in theirs.weights.items():
        torch.testing.assert_close(mine.weights[name], tensor, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    a, b = mine.state["optimizer"], theirs.state["optimizer"]
    assert a["state"].keys() == b["state"].keys() and len(a["param_groups"]) == len(b["param_groups"])
    for name, moments in b["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(a["state"][name][key], value, atol=1e-5, rtol=1e-5)
    assert mine.state["scheduler"] == theirs.state["scheduler"] and mine.state["loader"] == theirs.state["loader"]


def test_consolidate_names_a_folder_that_is_not_a_tag(tmp_path, capsys) -> None:
    from training.consolidate import main

    (tmp_path / "x.dcp").mkdir()
    assert main([str(tmp_path / "x.dcp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'x.dcp' / 'podtrain.json'}: missing (checkpoint x is incomplete)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcp"]  # nothing written


def test_an_unpublished_or_torn_folder_is_never_a_resume_point(one_rank_fsdp, tmp_path) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(one_rank_fsdp / "ckpt" / "step0000003.dcp", directory / "step0000003.dcp")
    (directory / ".tmp-step0000006.dcp.6").mkdir()  # a write in flight when the run was killed
    torn = directory / "step0000009.dcp"
    torn.mkdir()
    (torn / "podtrain.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 9}))
    warnings: list[str] = []
    loaded = ckpt.find_latest(directory, warnings.append)
    assert loaded is not None and loaded.tag == "step0000003" and loaded.sharded == directory / "step0000003.dcp"
    assert len(warnings) == 1 and "state.pt: missing (checkpoint step0000009 is incomplete)" in warnings[0]


@pytest.mark.slow  # two torchrun launches
def test_two_ranks_to_one_process(byte_corpus, reference, tmp_path) -> None:
    launch(config(byte_corpus, tmp_path, "fsdp", 2), tmp_path, 2)
    folder = tmp_path / "ckpt" / "step0000003.dcp"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in folder.iterdir()}  # one file per rank
    result = train(validate_config(config(byte_corpus, tmp_path / "one", "none", 1, num_steps=9)), resume=str(folder))
    assert_close(result.losses, reference[1], range(4, 10))


@pytest.mark.slow  # one torchrun launch
def test_one_rank_to_two_ranks(byte_corpus, one_rank_fsdp, reference, tmp_path) -> None:
    proc = launch(config(byte_corpus, tmp_path, "fsdp", 2, num_steps=9), tmp_path, 2,
                  "--resume", str(one_rank_fsdp / "ckpt" / "step0000003.dcp"))
    assert "world size changed (1 -> 2)" in proc.stdout + proc.stderr
    assert_close(losses(tmp_path), reference[1], range(4, 10))


def test_sigkill_during_an_async_write_leaves_the_previous_tag_whole(byte_corpus, reference, tmp_path) -> None:
    """Each rank's shard write takes 4 s (a slow volume); the run is killed while step 4's is in flight."""
    cfg = config(byte_corpus, tmp_path, "fsdp", 2, num_steps=400, save_every=2, eval_every=1000)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "-m", "training", str(path)], cwd=tmp_path,
                            env={**ENV, "PODTRAIN_TEST_SLOW_SAVE_S": "4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    directory = tmp_path / "ckpt"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not ((directory / "step0000002.dcp").is_dir()
                                              and list(directory.glob(".tmp-step0000004.dcp.*"))):
            time.sleep(0.05)
    finally:  # both ranks (torchrun starts each in a session of its own), then torchrun: as a pod dies
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [*map(int, workers), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert len(workers) == 2
    in_flight = list(directory.glob(".tmp-step0000004.dcp.*"))
    assert in_flight and not (in_flight[0] / ".metadata").exists()  # killed before step 4 was whole
    assert not (directory / "step0000004.dcp").exists()
    loaded = ckpt.find_latest(directory, pytest.fail)
    assert loaded is not None and loaded.tag == "step0000002"
    resumed = train(validate_config(config(byte_corpus, tmp_path, "none", 1, num_steps=6, save_every=1000)), resume="auto")
    assert min(resumed.losses) == 3  # continued after step 2: nothing trained twice, nothing skipped
    assert not list(directory.glob(".tmp-*"))  # the killed write's temporaries are gone
    assert_close(resumed.losses, reference[1], range(3, 7))


def test_a_sharded_tag_of_another_shape_names_the_first_tensor(byte_corpus, one_rank_fsdp, tmp_path) -> None:
    cfg = config(byte_corpus, tmp_path, "none", 1, model__ffn__hidden_size=96)
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.weight has shape \[128, 64\] in the checkpoint but \[96, 64\]"):
        train(validate_config(cfg), resume=str(one_rank_fsdp / "ckpt" / "step0000003.dcp"))


def test_export_or_init_from_a_sharded_tag_says_to_consolidate(one_rank_fsdp, tmp_path) -> None:
    from training.init import InitError, resolve_source
    from training.inference import find_checkpoint

    folder = one_rank_fsdp / "ckpt" / "step0000003.dcp"
    hint = f"a sharded \\(FSDP\\) tag; turn it into one file first: python -m training.consolidate {folder}"
    for spec in (str(folder), str(folder.with_suffix(""))):
        with pytest.raises(InitError, match=f"checkpoint {spec}: {hint}"):
            find_checkpoint(spec)  # orchestrate evaluate, sample and export start here
        with pytest.raises(InitError, match=f"init_from {spec}: {hint}"):
            resolve_source(spec)
    running = shutil.copytree(one_rank_fsdp / "ckpt", tmp_path / "ckpt", ignore=shutil.ignore_patterns("final.*", "best.*", "latest.*"))
    with pytest.raises(InitError, match="the newest tag is sharded"):
        resolve_source(str(running))  # a directory whose newest tag is sharded: never an older one silently


def test_a_damaged_shard_file_is_reported_and_the_previous_tag_used(one_rank_fsdp, tmp_path) -> None:
    directory = tmp_path / "ckpt"
    older = shutil.copytree(one_rank_fsdp / "ckpt" / "step0000003.dcp", directory / "step0000002.dcp")
    state = torch.load(older / "state.pt", weights_only=True)
    torch.save({**state, "step": 2}, older / "state.pt")  # the same shards, relabelled as an older tag
    (older / "podtrain.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 2}))
    shard = shutil.copytree(one_rank_fsdp / "ckpt" / "step0000003.dcp", directory / "step0000003.dcp") / "__0_0.distcp"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    warnings: list[str] = []
    loaded = ckpt.find_latest(directory, warnings.append)
    assert loaded is not None and loaded.tag == "step0000002"
    assert len(warnings) == 1 and f"{shard}: {shard.stat().st_size} of " in warnings[0], warnings
    assert warnings[0].endswith("bytes (checkpoint step0000003 is damaged)")


def test_publish_renames_whole_links_aliases_and_swaps_an_existing_tag(tmp_path, monkeypatch) -> None:
    from training import atomic
    from training.sharded_checkpoint import publish

    exchanged = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: exchanged.append(b.name) or real(a, b))
    for step, payload in ((3, b"old"), (6, b"new")):
        tmp = tmp_path / f".tmp-step{step:07d}.dcp.{step}"
        tmp.mkdir()
        (tmp / "__0_0.distcp").write_bytes(payload)
        publish(tmp_path, tmp, ckpt.step_tag(step), ["best"])
        assert not tmp.exists()
    assert (tmp_path / "best.dcp" / "__0_0.distcp").read_bytes() == b"new"
    assert os.path.samefile(tmp_path / "best.dcp" / "__0_0.distcp", tmp_path / "step0000006.dcp" / "__0_0.distcp")
    assert (tmp_path / "step0000003.dcp" / "__0_0.distcp").read_bytes() == b"old"
    assert exchanged == ["best.dcp"]  # the second best replaced the first in one step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.dcp", "step0000003.dcp", "step0000006.dcp"]


def test_keep_last_n_prunes_sharded_step_folders(tmp_path) -> None:
    for step in (1, 2, 3):
        folder = tmp_path / f"{ckpt.step_tag(step)}.dcp"
        folder.mkdir()
        (folder / "podtrain.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": step}))
    (tmp_path / "best.dcp").mkdir()
    (tmp_path / "best.dcp" / "podtrain.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 1}))
    assert ckpt.prune(tmp_path, 2, protect={ckpt.step_tag(3)}) == [ckpt.step_tag(1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.dcp", "step0000002.dcp", "step0000003.dcp"]


def test_resume_names_a_sharded_tag_three_ways(one_rank_fsdp) -> None:
    directory = one_rank_fsdp / "ckpt"
    for spec in (str(directory / "step0000003.dcp"), str(directory / "step0000003"), "step0000003"):
        loaded = ckpt.resolve_resume(spec, directory, pytest.fail)
        assert loaded is not None and loaded.sharded == directory / "step0000003.dcp" and loaded.step == 3, spec

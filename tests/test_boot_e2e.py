"""The pod's whole boot for real, from an empty volume: the manifest's start command clones a local
bare git repository (RUN_REPO) at RUN_REF, runs infra/boot.sh from the clone, which shards a local
corpus, trains the tokenizer, tokenizes, trains, and stops the pod through the fake RunPod API.
Then a spot preemption: SIGTERM with the 5 s grace during a run of 8 micro-batches per step, and
the next boot (RUN_REF moved to a newer tag) resumes and matches the uninterrupted run's losses.

Nothing but the far end is faked: the real `orchestrate`, `fineweb-sharder` and trainer run (from
the clone: PYTHONPATH points at it), git clones for real, the stop goes through the real SDK to the
loopback fake API. TensorBoard is a stand-in (no server on :6006 in a test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import stdlib_documents
from fake_runpod import FakeRunPod

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
COMMAND = yaml.safe_load((REPO / "infra" / "runpod-pod.yaml").read_text())["command"]
KEY = "rp-e2e-key-1f2e3d"
STEPS = 40
STAGE_ORDER = ["install", "prep", "shard", "tokenizer", "train"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A bare repository of this working tree (tag v1, then v2 one commit later), a corpus, a tiny
    config with 8 micro-batches per step, stand-ins, and the fake RunPod API."""
    tmp = tmp_path_factory.mktemp("boot_e2e")
    src = tmp / "src"
    files = _git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _git(src, "init", "-q", "-b", "main")
    _git(src, "add", "-A")
    _git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "podtrain")
    _git(src, "tag", "v1")
    (src / "NOTE").write_text("a later commit\n")
    _git(src, "add", "NOTE")
    _git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "later")
    _git(src, "tag", "v2")
    bare = tmp / "podtrain.git"
    _git(tmp, "clone", "-q", "--bare", str(src), str(bare))

    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_documents(300_000)))
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "train_data": "unset", "checkpoint_dir": "unset", "seq_len": 32, "batch_size": 2,
        "gradient_accumulation_steps": 8, "num_steps": STEPS, "save_every": 10_000, "log_every": 1,
        "eval_every": 10_000, "num_workers": 0, "device": "cpu",
        "model": {"vocab_size": 512, "d_model": 32, "num_layers": 1, "max_seq_len": 64,
                  "attention": {"n_heads": 2}, "ffn": {"hidden_size": 64}},
    }))
    stand_ins = tmp / "bin"
    stand_ins.mkdir()
    (stand_ins / "tensorboard").write_text("#!/bin/sh\nexec sleep 600\n")
    (stand_ins / "tensorboard").chmod(0o755)
    with FakeRunPod(KEY) as api:
        yield {"tmp": tmp, "repo": bare, "corpus": corpus, "config": config, "bin": stand_ins,
               "api": api, "v1": _git(src, "rev-parse", "v1")}


def _env(world: dict, volume: Path, pod_id: str, ref: str) -> dict[str, str]:
    """What RunPod gives the container: the manifest's env (a spot pod's), and its own."""
    return {
        "PATH": f"{world['bin']}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(world["tmp"]), "PYTHONPATH": str(volume / "transformer"),
        "PODTRAIN_WORKSPACE": str(volume), "PODTRAIN_PROJECT": str(volume / "transformer"),
        "RUN_REPO": f"file://{world['repo']}", "RUN_REF": ref,
        "RUN_SHARD": "1", "RUN_INPUT": str(world["corpus"]), "RUN_EXPERIMENT": "e2e",
        "RUN_CONFIG": str(world["config"]), "SHARD_LINES": "10", "RUN_PREEMPTION_GRACE_S": "5",
        "HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}",  # no such secret: RunPod leaves it literal
        "BOOT_START_SCRIPT": str(world["tmp"] / "no-start.sh"),
        "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": KEY, "RUNPOD_API_BASE_URL": world["api"].url,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The container's start command, exactly as the manifest has it."""
    return subprocess.Popen(["bash", "-c", COMMAND], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _end(proc: subprocess.Popen[bytes]) -> int:
    """`docker stop`: SIGTERM to the container's command, then SIGKILL to everything left."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _losses(volume: Path) -> dict[int, float]:
    path = volume / "runs/e2e/checkpoints/metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _steps(volume: Path) -> list[int]:
    path = volume / "runs/e2e/checkpoints/metrics.jsonl"
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def _wait(what: str, done, proc: subprocess.Popen[bytes], log: Path, seconds: float = 420) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert proc.poll() is None, f"the boot ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {seconds}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def _stopped(api: FakeRunPod, pod_id: str) -> bool:
    return any(r.input.get("podId") == pod_id for r in api.find("podStop"))


def _stages(log: str) -> list[str]:
    return [line.split(" boot: stage ", 1)[1].split(":", 1)[0] for line in log.splitlines()
            if " boot: stage " in line and ": start: " in line]


@pytest.fixture(scope="module")
def reference(world: dict) -> dict[int, float]:
    """An empty volume, booted once and left alone: it trains every step and stops the pod."""
    api, volume, log = world["api"], world["tmp"] / "volume-ref", world["tmp"] / "ref.log"
    pod_id = api.add_pod(name="podtrain-e2e")["id"]
    proc = _start(_env(world, volume, pod_id, world["v1"]), log)
    try:
        _wait("pod stop", lambda: _stopped(api, pod_id), proc, log)
    finally:
        status = _end(proc)
    out = log.read_text()
    assert status == 143, out[-4000:]  # parked after the stop until RunPod ends the container
    assert f"bootstrap: RUN_REF {world['v1']} is {world['v1'][:7]}" in out
    assert _stages(out) == STAGE_ORDER, out[-4000:]
    assert "boot finished: training is complete" in out
    assert f"halt: stopping pod {pod_id}" in out
    assert api.pods[pod_id]["desiredStatus"] == "EXITED"
    assert "warning: unset HF_TOKEN" in out and "RUNPOD_SECRET" not in out
    assert (volume / "datasets/train/e2e/manifest.json").exists()
    assert (volume / "artifacts/tokenizer/e2e/tokenizer.json").exists()
    assert _steps(volume) == list(range(1, STEPS + 1))
    return _losses(volume)


def test_an_empty_volume_boots_to_a_finished_run_and_stops_the_pod(reference: dict) -> None:
    assert len(reference) == STEPS


def test_a_preempted_spot_pod_resumes_and_matches_the_uninterrupted_losses(
    world: dict, reference: dict[int, float]
) -> None:
    api, volume = world["api"], world["tmp"] / "volume-spot"
    first_log, second_log = world["tmp"] / "spot1.log", world["tmp"] / "spot2.log"

    # Boot 1: SIGTERM in the middle of training (RunPod's spot preemption, 5 s before SIGKILL).
    first_pod = api.add_pod(name="podtrain-e2e")["id"]
    first = _start(_env(world, volume, first_pod, world["v1"]), first_log)
    try:
        _wait("ten training steps", lambda: len(_losses(volume)) >= 10, first, first_log)
        first.send_signal(signal.SIGTERM)
        status = first.wait(timeout=5)  # the grace RunPod gives before SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    out = first_log.read_text()
    assert status == 143, out[-4000:]
    assert "stage train: interrupted by SIGTERM" in out and not _stopped(api, first_pod)
    last_step = max(_losses(volume))
    tags = sorted(int(p.name[4:11]) for p in (volume / "runs/e2e/checkpoints").glob(
        "step*.safetensors"))
    assert tags and tags[-1] >= last_step, (tags, last_step)  # no completed step is lost
    shards = volume / "datasets/train/e2e/manifest.json"
    tokenizer = volume / "artifacts/tokenizer/e2e/tokenizer.json"
    before = (shards.stat().st_mtime_ns, tokenizer.stat().st_mtime_ns)

    # Boot 2 on the same volume, RUN_REF moved on to v2: fetch, reuse, resume, finish, stop.
    second_pod = api.add_pod(name="podtrain-e2e")["id"]
    started = time.monotonic()
    second = _start(_env(world, volume, second_pod, "v2"), second_log)
    try:
        _wait("the first resumed step", lambda: max(_losses(volume), default=0) > tags[-1],
              second, second_log)
        to_first_step = time.monotonic() - started
        _wait("pod stop", lambda: _stopped(api, second_pod), second, second_log)
    finally:
        _end(second)
    out = second_log.read_text()
    assert "bootstrap: RUN_REF v2 is " in out
    assert _stages(out) == STAGE_ORDER
    assert "[stage] tokenizer: done earlier with the same inputs, skipped" in out
    assert f"at step {tags[-1]}" in out and "resumed from" in out
    assert (shards.stat().st_mtime_ns, tokenizer.stat().st_mtime_ns) == before  # reused as is
    assert _steps(volume) == list(range(1, STEPS + 1))  # nothing lost, nothing done twice
    assert _losses(volume) == pytest.approx(reference, abs=1e-5)
    print(f"\nsecond boot: first resumed step {to_first_step:.1f}s after the start command")

"""The pod's whole boot for real, from an empty volume and the shipped manifest's settings: the
manifest's start command clones RUN_REPO (a private repository over HTTP, its token in GIT_TOKEN)
at RUN_REF, runs infra/boot.sh from the clone, which (RUN_SHARD unset: auto) shards a local corpus,
trains the tokenizer, tokenizes, trains, and stops the pod. Then a spot preemption: SIGTERM with
the 5 s grace during a run of 8 micro-batches per step, and the next boot (RUN_REPO moved to
another URL, RUN_REF to a newer tag) resumes and matches the uninterrupted run's losses.

Stand-ins only for the GPU (`nvidia-smi`) and `runpodctl` (it records the stop). Everything else
is real: `orchestrate`, `fineweb-sharder` and the trainer (from the clone: PYTHONPATH points at
it), TensorBoard (asleep in the spot test, whose 5 s grace it would eat into), git over smart HTTP (`git http-backend` behind a loopback server that demands
the token, as a private GitHub repository does).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import stdlib_documents

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
COMMAND = yaml.safe_load((REPO / "infra" / "runpod-pod.yaml").read_text())["command"]
GIT_TOKEN = "ghp_" + "E2e0" * 9  # shaped like a GitHub token: nowhere on the volume after a boot
POD_KEY = "rpa_" + "E2E" * 12
STEPS = 40
STAGE_ORDER = ["install", "prep", "shard", "tokenizer", "train"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


class _PrivateGit(BaseHTTPRequestHandler):
    """Smart HTTP through `git http-backend` (CGI), for x-access-token:GIT_TOKEN only: a request
    without the token gets 401 and a Basic challenge, so git must ask its credential helper."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._serve(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def _serve(self, body: bytes) -> None:
        expected = "Basic " + base64.b64encode(f"x-access-token:{GIT_TOKEN}".encode()).decode()
        authorized = self.headers.get("Authorization") == expected
        self.server.seen.append(authorized)
        if not authorized:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="podtrain"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.server.root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
               "REQUEST_METHOD": self.command, "REMOTE_USER": "x-access-token",
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body))}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                             check=True).stdout
        header, _, payload = out.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        status = next((int(line.split()[1]) for line in lines if line.startswith("Status:")), 200)
        self.send_response(status)
        for line in lines:
            if not line.startswith("Status:"):
                name, _, value = line.partition(": ")
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A bare repository of this working tree (tag v1, then v2 one commit later) served as a
    private HTTP repository, a corpus, a tiny config with 8 micro-batches per step, and the
    stand-ins for the GPU and runpodctl."""
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
    served = tmp / "served"
    _git(tmp, "clone", "-q", "--bare", str(src), str(served / "podtrain.git"))
    moved = tmp / "moved.git"  # where the repository is later: a changed RUN_REPO
    _git(tmp, "clone", "-q", "--bare", str(src), str(moved))

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
    (stand_ins / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB'\n")
    (stand_ins / "runpodctl").write_text(
        '#!/bin/sh\necho "runpodctl $*" >> "$STOP_LOG"\necho \'{"desiredStatus": "EXITED"}\'\n')
    quiet = tmp / "quiet-bin"  # the spot test's TensorBoard: asleep, so the real one's start-up
    quiet.mkdir()              # takes no CPU from the trainer's 5 s grace on a small test machine
    (quiet / "tensorboard").write_text("#!/bin/sh\nexec sleep 600\n")
    for tool in [*stand_ins.iterdir(), *quiet.iterdir()]:
        tool.chmod(0o755)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PrivateGit)
    server.root, server.seen = served, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"tmp": tmp, "repo": f"http://127.0.0.1:{server.server_port}/podtrain.git",
               "moved": f"file://{moved}", "git": server, "corpus": corpus, "config": config,
               "bin": stand_ins, "quiet": quiet, "v1": _git(src, "rev-parse", "v1")}
    finally:
        server.shutdown()
        server.server_close()


def _env(world: dict, volume: Path, pod_id: str, ref: str, repo: str,
         quiet: bool = False) -> dict[str, str]:
    """What RunPod gives the container: the shipped manifest's env (RUN_SHARD unset, a spot
    pod's grace), the knobs this test needs, and RunPod's own variables."""
    return {
        "PATH": ":".join([*([str(world["quiet"])] if quiet else []), str(world["bin"]),
                          str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(world["tmp"]), "PYTHONPATH": str(volume / "transformer"),
        "PODTRAIN_WORKSPACE": str(volume), "PODTRAIN_PROJECT": str(volume / "transformer"),
        "RUN_REPO": repo, "RUN_REF": ref, "GIT_TOKEN": GIT_TOKEN,
        "RUN_INPUT": str(world["corpus"]), "RUN_EXPERIMENT": "e2e",
        "RUN_CONFIG": str(world["config"]), "SHARD_LINES": "10", "RUN_PREEMPTION_GRACE_S": "5",
        "HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}",  # no such secret: RunPod leaves it literal
        "BOOT_START_SCRIPT": str(world["tmp"] / "no-start.sh"),
        "RUN_DEADLINE": str(int(time.time()) + 3600), "PODTRAIN_MANAGED": "1",
        "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": POD_KEY,
        "STOP_LOG": str(world["tmp"] / f"{pod_id}.stops"),
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


def _stopped(world: dict, pod_id: str) -> bool:
    stops = world["tmp"] / f"{pod_id}.stops"
    return stops.exists() and f"pod stop {pod_id}" in stops.read_text()


def _stages(log: str) -> list[str]:
    return [line.split(" boot: stage ", 1)[1].split(":", 1)[0] for line in log.splitlines()
            if " boot: stage " in line and ": start: " in line]


def _no_secret_on(volume: Path) -> None:
    for path in volume.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert GIT_TOKEN.encode() not in data and POD_KEY.encode() not in data, path


@pytest.fixture(scope="module")
def reference(world: dict) -> dict[int, float]:
    """An empty volume, booted once and left alone: it trains every step and stops the pod."""
    volume, log = world["tmp"] / "volume-ref", world["tmp"] / "ref.log"
    proc = _start(_env(world, volume, "podref", world["v1"], world["repo"]), log)
    try:
        _wait("pod stop", lambda: _stopped(world, "podref"), proc, log)
    finally:
        status = _end(proc)
    out = log.read_text()
    assert status == 143, out[-4000:]  # parked after the stop until RunPod ends the container
    assert f"bootstrap: RUN_REF {world['v1']} is {world['v1'][:7]}" in out
    assert _stages(out) == STAGE_ORDER, out[-4000:]
    assert "boot finished: training is complete" in out
    assert "halt: stopping pod podref" in out and "stop: 'runpodctl pod stop podref' accepted" in out
    assert "deadline: the pod stops at" in out
    assert "warning: unset HF_TOKEN" in out and "RUNPOD_SECRET" not in out
    assert "gpus: NVIDIA H100 80GB HBM3" in out
    assert (volume / "datasets/train/e2e/manifest.json").exists()
    assert (volume / "artifacts/tokenizer/e2e/tokenizer.json").exists()
    assert _steps(volume) == list(range(1, STEPS + 1))
    beat = json.loads((volume / "runs/e2e/heartbeat").read_text())
    assert (beat["stage"], beat["unit"]) == ("train", "steps") and 1 <= beat["progress"] <= STEPS
    # a private repository: git asked for the token (401 first), got it from the environment, and
    # kept it nowhere: not in .git/config, not anywhere on the volume
    assert world["git"].seen[0] is False and True in world["git"].seen
    assert _git(volume / "transformer", "remote", "get-url", "origin") == world["repo"]
    _no_secret_on(volume)
    return _losses(volume)


def test_an_empty_volume_boots_to_a_finished_run_and_stops_the_pod(reference: dict) -> None:
    assert len(reference) == STEPS


def test_a_preempted_spot_pod_resumes_and_matches_the_uninterrupted_losses(
    world: dict, reference: dict[int, float]
) -> None:
    volume = world["tmp"] / "volume-spot"
    first_log, second_log = world["tmp"] / "spot1.log", world["tmp"] / "spot2.log"

    # Boot 1: SIGTERM in the middle of training (RunPod's spot preemption, 5 s before SIGKILL).
    first = _start(_env(world, volume, "spot1", world["v1"], world["repo"], quiet=True), first_log)
    try:
        _wait("ten training steps", lambda: len(_losses(volume)) >= 10, first, first_log)
        first.send_signal(signal.SIGTERM)
        try:
            status = first.wait(timeout=5)  # the grace RunPod gives before SIGKILL
        except subprocess.TimeoutExpired:
            pytest.fail(f"the boot outlived RunPod's 5 s grace:\n{first_log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    out = first_log.read_text()
    assert status == 143, out[-4000:]
    assert "stage train: interrupted by SIGTERM" in out and not _stopped(world, "spot1")
    last_step = max(_losses(volume))
    tags = sorted(int(p.name[4:11]) for p in (volume / "runs/e2e/checkpoints").glob(
        "step*.safetensors"))
    assert tags and tags[-1] >= last_step, (tags, last_step)  # no completed step is lost
    shards = volume / "datasets/train/e2e/manifest.json"
    tokenizer = volume / "artifacts/tokenizer/e2e/tokenizer.json"
    before = (shards.stat().st_mtime_ns, tokenizer.stat().st_mtime_ns)

    # Boot 2 on the same volume, the repository moved (a new RUN_REPO) and RUN_REF moved on to
    # v2: set-url, fetch, reuse, resume, finish, stop.
    started = time.monotonic()
    second = _start(_env(world, volume, "spot2", "v2", world["moved"], quiet=True), second_log)
    try:
        _wait("the first resumed step", lambda: max(_losses(volume), default=0) > tags[-1],
              second, second_log)
        to_first_step = time.monotonic() - started
        _wait("pod stop", lambda: _stopped(world, "spot2"), second, second_log)
    finally:
        _end(second)
    out = second_log.read_text()
    assert "bootstrap: RUN_REF v2 is " in out
    assert _git(volume / "transformer", "remote", "get-url", "origin") == world["moved"]
    assert _stages(out) == ["install", "prep", "tokenizer", "train"]  # complete shards: auto reuses
    assert "stage shard: skipped (RUN_SHARD=auto)" in out
    assert "[stage] tokenizer: done earlier with the same inputs, skipped" in out
    assert f"at step {tags[-1]}" in out and "resumed from" in out
    assert (shards.stat().st_mtime_ns, tokenizer.stat().st_mtime_ns) == before  # reused as is
    assert _steps(volume) == list(range(1, STEPS + 1))  # nothing lost, nothing done twice
    assert _losses(volume) == pytest.approx(reference, abs=1e-5)
    _no_secret_on(volume)
    print(f"\nsecond boot: first resumed step {to_first_step:.1f}s after the start command")

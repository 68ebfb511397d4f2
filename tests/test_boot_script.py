"""infra/boot.sh with stand-ins for the commands it drives: stage order, flags, logs, restarts.

The stand-ins (`orchestrate`, `fineweb-sharder`, `tensorboard`, `pip`, `runpodctl`, the image's
start script) are tiny shell scripts that append their argv to a log, so these tests check the
boot's own contract in about a second each: what runs, in which order, with which flags, what
boot.log says, and that a failure never turns into a restart loop. The end-to-end boot with the
real orchestrator is a separate test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

BOOT = Path(__file__).resolve().parents[1] / "infra" / "boot.sh"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ boot: ", re.MULTILINE)
SECRET = "hf_" + "Q" * 34  # shaped like a real token; must never reach a log

# Each stand-in logs "<name> <args>"; orchestrate fails when its --stop-after value (or "train",
# for the run without one) equals $FAKE_FAIL. In the training run, FAKE_HANG=1 waits for SIGTERM,
# records it and exits 143 as a trainer that saved its state would (FAKE_HANG=deaf ignores
# SIGTERM, as a trainer stuck in a collective does), and FAKE_STEPS=N writes a step to the
# heartbeat file every second N times. Its env is written to $FAKE_LOG.env.
# A stand-in named by FAKE_HANG_AT (pip, fineweb-sharder, or orchestrate's --stop-after value)
# hangs without progress; the pid of what it waits on goes to $FAKE_LOG.hung.
HANG = r"""if [[ "${FAKE_HANG_AT:-}" == "${HANG_NAME:-$(basename "$0")}" ]]; then
  sleep 60 >/dev/null 2>&1 &
  echo $! > "$FAKE_LOG.hung"
  wait $!
fi
"""
ORCHESTRATE = r"""#!/usr/bin/env bash
echo "orchestrate $*" >> "$FAKE_LOG"
env > "$FAKE_LOG.env"
stage=train
prev=""
for arg in "$@"; do
  [[ "$prev" == --stop-after ]] && stage=$arg
  [[ "$prev" == --workspace ]] && root=$arg
  [[ "$prev" == --experiment ]] && exp=$arg
  prev=$arg
done
if [[ "$stage" == "${FAKE_FAIL:-}" ]]; then echo "fake orchestrate: $stage broke" >&2; exit 3; fi
HANG_NAME=$stage
""" + HANG + r"""
if [[ "$stage" == train && -n "${FAKE_STEPS:-}" ]]; then
  for step in $(seq "$FAKE_STEPS"); do
    sleep 1
    echo "{\"stage\": \"train\", \"unit\": \"steps\", \"progress\": $step}" > "$RUN_HEARTBEAT"
  done
fi
if [[ "$stage" == train && "${FAKE_HANG:-0}" != 0 ]]; then
  if [[ "$FAKE_HANG" == deaf ]]; then
    trap 'echo "orchestrate ignored TERM" >> "$FAKE_LOG"' TERM
  else
    trap 'echo "orchestrate got TERM" >> "$FAKE_LOG"; kill "$sleeper"; exit 143' TERM
  fi
  sleep 30 >/dev/null 2>&1 &
  sleeper=$!
  echo "$sleeper" > "$FAKE_LOG.sleeper"
  touch "$FAKE_LOG.training"
  while kill -0 "$sleeper" 2>/dev/null; do wait "$sleeper"; done
fi
exit 0
"""
RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
""" + HANG

# `pip install -e <project>` installs the two console scripts, as the real install would; the
# constraints file it was given (-c FILE) is copied to $FAKE_LOG.constraints.
PIP = r"""#!/usr/bin/env bash
echo "pip $*" >> "$FAKE_LOG"
""" + HANG + r"""
prev=""
for arg in "$@"; do [[ "$prev" == -c ]] && cp "$arg" "$FAKE_LOG.constraints"; prev=$arg; done
cp "$FAKE_STASH/orchestrate" "$FAKE_STASH/fineweb-sharder" "$(dirname "$0")/"
"""
# runpodctl as its sources (runpod/runpodctl, 2026-07) behave: `pod stop ID` prints the pod (env
# included) and exits 0, or exits 1 on an API error (REST v1, which it calls, is retired);
# the legacy `stop pod ID` prints `pod "ID" stopped`, or `pod "ID" stop failed; status is ...`
# and exits 0 all the same. FAKE_RUNPODCTL=v1-retired fails the first, =both-fail both.
RUNPODCTL = r"""#!/usr/bin/env bash
echo "runpodctl $*" >> "$FAKE_LOG"
mode=${FAKE_RUNPODCTL:-ok}
case "$1 $2" in
  "pod stop")
    if [[ "$mode" != ok ]]; then
      echo 'Error: api error: {"error":"no such route"} (status 404)' >&2; exit 1
    fi
    echo "{\"id\": \"$3\", \"desiredStatus\": \"EXITED\", \"env\": {\"HF_TOKEN\": \"$HF_TOKEN\"}}" ;;
  "stop pod")
    if [[ "$mode" == both-fail ]]; then echo "pod \"$3\" stop failed; status is RUNNING"
    else echo "pod \"$3\" stopped"; fi ;;
esac
"""
# The real interpreter (with this venv's torch), as the image's `python`.
PYTHON = f"#!/bin/sh\nexec {sys.executable} \"$@\"\n"


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def pod(tmp_path: Path) -> dict:
    """A fake pod: workspace, project checkout, bin dir of stand-ins, and the env boot.sh sees."""
    bin_dir, stash = tmp_path / "bin", tmp_path / "stash"
    bin_dir.mkdir()
    stash.mkdir()
    project = tmp_path / "transformer"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "tiny.yaml").write_text("num_steps: 2\n")
    (project / "pyproject.toml").write_text("[project]\nname = 'podtrain'\n")
    _write(stash / "orchestrate", ORCHESTRATE)
    _write(stash / "fineweb-sharder", RECORDER)
    _write(bin_dir / "tensorboard", RECORDER)
    _write(bin_dir / "runpodctl", RUNPODCTL)
    _write(bin_dir / "pip", PIP)
    _write(bin_dir / "python", PYTHON)
    _write(tmp_path / "start.sh", RECORDER)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\nanother document\n")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_STASH": str(stash),
        "PODTRAIN_WORKSPACE": str(tmp_path / "workspace"),
        "PODTRAIN_PROJECT": str(project),
        "BOOT_START_SCRIPT": str(tmp_path / "start.sh"),
        "BOOT_HALT": "exit",
        "RUN_SHARD": "1",
        "RUN_INPUT": str(corpus),
        "RUN_EXPERIMENT": "tiny-exp",
        "RUN_CONFIG": "configs/tiny.yaml",
        "SHARD_LINES": "1000",
        "HF_TOKEN": SECRET,
    }
    root = tmp_path / "workspace"
    return {"env": env, "bin": bin_dir, "stash": stash, "root": root, "tmp": tmp_path,
            "run_dir": root / "runs" / "tiny-exp", "log": tmp_path / "calls.log"}


def _calls(pod: dict) -> list[str]:
    return pod["log"].read_text().splitlines() if pod["log"].exists() else []


def _boot(pod: dict, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BOOT)], env={**pod["env"], **env}, capture_output=True,
                          text=True, timeout=60, cwd=pod["tmp"])


def _spawn(pod: dict, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["bash", str(BOOT)], env={**pod["env"], **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=pod["tmp"],
                            start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"boot ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _end(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM the boot (as `pod stop` does), then clean up anything left in its session."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_four_stages_run_in_order_with_the_documented_flags(pod: dict) -> None:
    root, exp = pod["root"], "tiny-exp"
    result = _boot(pod)
    assert result.returncode == 0, result.stdout + result.stderr

    common = (f"--mode cloud --workspace {root} --experiment {exp} --config configs/tiny.yaml "
              f"--train-shard-lines 1000 --reuse-shards")
    calls = [c for c in _calls(pod) if not c.startswith("start.sh")]
    # pip installs the cuda extra, held to the image's torch by a constraints file
    pip = re.fullmatch(r"pip install --no-input -e (\S+) -c (\S+)", calls.pop(0))
    assert pip and pip[1] == f"{pod['env']['PODTRAIN_PROJECT']}[cuda]"
    assert Path(pod["env"]["FAKE_LOG"] + ".constraints").read_text() == f"torch=={torch.__version__}\n"
    assert not Path(pip[2]).exists()  # on the container disk, and removed after the install
    assert calls == [
        f"fineweb-sharder --mode split --lines-per-shard 1000 --experiment {exp} "
        f"--workspace {root} --input {pod['env']['RUN_INPUT']}",
        f"orchestrate {common} --stop-after emit",
        f"tensorboard --logdir {root}/runs/{exp}/tensorboard --host 0.0.0.0 --port 6006",
        f"orchestrate {common} --stages pretrain",
    ]
    assert "start.sh " in _calls(pod)  # the image's SSH/Jupyter starter was launched too
    for sub in (f"datasets/train/{exp}", f"datasets/val/{exp}", f"artifacts/tokenizer/{exp}",
                f"cache/{exp}", f"runs/{exp}/tensorboard", "hf_cache/datasets"):
        assert (root / sub).is_dir(), sub

    boot_log = (pod["run_dir"] / "boot.log").read_text()
    assert boot_log == result.stdout  # the pod log and boot.log carry the same lines
    stages = re.findall(r"boot: stage (\w+): (start|done|skipped)", boot_log)
    assert stages == [(s, e) for s in ("install", "prep", "shard", "tokenizer", "train")
                      for e in ("start", "done")]
    assert all(TIMESTAMP.match(line) for line in boot_log.splitlines() if " boot: " in line)
    assert "HF token: set" in boot_log and SECRET not in boot_log + result.stderr
    assert not (pod["run_dir"] / "BOOT_FAILED").exists()


def test_a_second_boot_reuses_the_install_and_skips_sharding(pod: dict) -> None:
    assert _boot(pod).returncode == 0
    first = len(_calls(pod))
    result = _boot(pod, RUN_SHARD="0")
    assert result.returncode == 0, result.stdout
    second = [c for c in _calls(pod)[first:] if not c.startswith(("start.sh", "tensorboard"))]
    assert [c.split()[0] for c in second] == ["orchestrate", "orchestrate"]  # no pip, no sharder
    assert "stage shard: skipped (RUN_SHARD=0)" in result.stdout
    assert (pod["run_dir"] / "boot.log").read_text().count("---- boot of experiment") == 2


def test_run_stages_prepares_the_sft_data_and_chains_the_stages(pod: dict) -> None:
    root, exp = pod["root"], "tiny-exp"
    result = _boot(pod, RUN_SHARD="0", RUN_STAGES="instruct,tool", RUN_TOOL_LIMIT="500")
    assert result.returncode == 0, result.stdout
    calls = [c for c in _calls(pod) if c.startswith("orchestrate")]
    assert calls == [
        f"orchestrate sft prepare --mode cloud --workspace {root} --experiment {exp} --tool-limit 500 --stages instruct tool",
        f"orchestrate --mode cloud --workspace {root} --experiment {exp} --config configs/tiny.yaml "
        f"--train-shard-lines 1000 --reuse-shards --stages instruct,tool",
    ]
    assert "stage tokenizer: skipped (RUN_STAGES=instruct,tool has no pretrain)" in result.stdout


def test_hub_fineweb_is_the_default_shard_source(pod: dict) -> None:
    env = dict(pod["env"])
    del env["RUN_INPUT"]
    pod["env"] = env
    assert _boot(pod, RUN_FINEWEB_NAME="CC-MAIN-2024-10").returncode == 0
    sharder = next(c for c in _calls(pod) if c.startswith("fineweb-sharder"))
    assert sharder.endswith("--name CC-MAIN-2024-10") and "--input" not in sharder


def test_a_failed_stage_is_recorded_and_the_same_boot_is_refused(pod: dict) -> None:
    failed = _boot(pod, FAKE_FAIL="emit")
    assert failed.returncode == 3
    marker = pod["run_dir"] / "BOOT_FAILED"
    assert marker.read_text().startswith("stage=tokenizer\nstatus=3\n")
    assert "fake orchestrate: emit broke" in (pod["run_dir"] / "boot.log").read_text()
    assert "stage tokenizer: FAILED" in failed.stdout
    assert not any(c.startswith("tensorboard") for c in _calls(pod))  # training never started

    # A restart with the same settings does nothing but refuse: no stage runs, no GPU time.
    calls_before = len(_calls(pod))
    refused = _boot(pod)
    assert refused.returncode == 3
    assert "refusing to boot: stage 'tokenizer' failed" in refused.stdout
    assert [c for c in _calls(pod)[calls_before:] if not c.startswith("start.sh")] == []

    # A changed setting (or BOOT_RETRY=1) is a new attempt; success clears the marker.
    retried = _boot(pod, SHARD_LINES="2000")
    assert retried.returncode == 0, retried.stdout
    assert "failed on a previous boot with other settings: retrying" in retried.stdout
    assert not marker.exists()


def test_boot_retry_forces_a_refused_boot(pod: dict) -> None:
    assert _boot(pod, FAKE_FAIL="train").returncode == 3
    assert (pod["run_dir"] / "BOOT_FAILED").read_text().startswith("stage=train\n")
    result = _boot(pod, BOOT_RETRY="1")
    assert result.returncode == 0 and "BOOT_RETRY=1: retrying" in result.stdout


def test_refusal_inside_a_pod_stops_it_instead_of_looping(pod: dict) -> None:
    assert _boot(pod, FAKE_FAIL="emit").returncode == 3
    proc = _spawn(pod, BOOT_HALT="stop", RUNPOD_POD_ID="abc123pod")
    deadline = time.monotonic() + 20
    while "runpodctl pod stop abc123pod" not in _calls(pod):
        assert proc.poll() is None and time.monotonic() < deadline, "runpodctl was not called"
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None  # still parked while RunPod stops the pod: no exit, no restart
    status, out = _end(proc)
    assert status == 143 and "halt: stopping pod abc123pod" in out


def test_without_runpodctl_a_failure_parks_the_pod_for_inspection(pod: dict) -> None:
    (pod["bin"] / "runpodctl").unlink()
    proc = _spawn(pod, FAKE_FAIL="emit", BOOT_HALT="stop", RUNPOD_POD_ID="abc123pod")
    _wait_for(pod["run_dir"] / "BOOT_FAILED", proc)
    time.sleep(0.3)
    assert proc.poll() is None  # parked, not exited into a restart loop
    status, out = _end(proc)
    assert status == 143 and "halt: parked" in out


def test_sigterm_reaches_training_and_is_not_a_failure(pod: dict) -> None:
    proc = _spawn(pod, FAKE_HANG="1")
    _wait_for(Path(pod["env"]["FAKE_LOG"] + ".training"), proc)
    status, out = _end(proc)
    assert status == 143
    assert "orchestrate got TERM" in _calls(pod)
    assert "stage train: interrupted by SIGTERM" in out and "the next boot resumes" in out
    assert not (pod["run_dir"] / "BOOT_FAILED").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [({"RUN_SHARD": "yes"}, "RUN_SHARD='yes' must be auto, 0 or 1"),
     ({"SHARD_LINES": "0"}, "SHARD_LINES='0' must be a positive integer"),
     ({"RUN_STAGES": "pretrain,chat"}, "RUN_STAGES='pretrain,chat' must be a comma-separated subset of pretrain,instruct,tool,reasoning")],
)
def test_bad_knobs_fail_the_prep_stage(pod: dict, env: dict, message: str) -> None:
    result = _boot(pod, **env)
    assert result.returncode == 2 and message in result.stdout
    assert (pod["run_dir"] / "BOOT_FAILED").read_text().startswith("stage=prep\n")
    assert not any(c.startswith(("orchestrate", "fineweb-sharder")) for c in _calls(pod))


def test_missing_project_fails_the_install_stage_with_a_hint(pod: dict) -> None:
    result = _boot(pod, PODTRAIN_PROJECT=str(pod["tmp"] / "nowhere"))
    assert result.returncode == 1
    assert "no podtrain: clone it to" in result.stdout
    assert (pod["run_dir"] / "BOOT_FAILED").read_text().startswith("stage=install\n")


def _pid_alive(pid: int) -> bool:
    """Running, not gone or a zombie (an orphan killed here waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_call(pod: dict, call: str, proc: subprocess.Popen[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while call not in _calls(pod):
        assert proc.poll() is None, f"boot ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{call!r} never happened: {_calls(pod)}"
        time.sleep(0.1)


def _wait_for_log(pod: dict, text: str, proc: subprocess.Popen[str], seconds: float = 30) -> None:
    log, deadline = pod["run_dir"] / "boot.log", time.monotonic() + seconds
    while text not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.05)


def test_the_watchdog_stops_a_hung_trainer_and_the_pod(pod: dict) -> None:
    proc = _spawn(pod, FAKE_HANG="1", BOOT_WATCHDOG_MINUTES="0.05", BOOT_HALT="stop",
                  RUNPOD_POD_ID="abc123pod")  # 3 s without a step
    _wait_for_call(pod, "runpodctl pod stop abc123pod", proc)
    assert "orchestrate got TERM" in _calls(pod)  # the trainer could checkpoint first
    status, out = _end(proc)
    assert status == 143
    log = (pod["run_dir"] / "boot.log").read_text()
    assert "watchdog: stage train made no progress in" in log and "for 3s" in log
    # A hang now counts as a failure (behaviour changed with every stage watched): a pod that
    # hung once with these settings is not restarted into the same hang unattended.
    assert (pod["run_dir"] / "BOOT_FAILED").read_text().startswith("stage=train\nstatus=124\n")


@pytest.mark.parametrize(("stage", "hang_at"), [
    ("install", "pip"), ("shard", "fineweb-sharder"), ("tokenizer", "emit"), ("train", "train")])
def test_the_watchdog_kills_any_stage_that_stops_making_progress(pod: dict, stage: str,
                                                                  hang_at: str) -> None:
    result = _boot(pod, FAKE_HANG_AT=hang_at,
                   **{f"BOOT_WATCHDOG_MINUTES_{stage.upper()}": "0.03"})  # 2 s without a beat
    assert result.returncode == 124, result.stdout
    assert f"watchdog: stage {stage} made no progress in {pod['run_dir']}/heartbeat for 2s" \
        in result.stdout
    marker = (pod["run_dir"] / "BOOT_FAILED").read_text()
    assert marker.startswith(f"stage={stage}\nstatus=124\n")
    assert f"BOOT_WATCHDOG_MINUTES_{stage.upper()}" in marker
    assert not _pid_alive(int(Path(pod["env"]["FAKE_LOG"] + ".hung").read_text()))
    later = {"install": "fineweb-sharder", "shard": "orchestrate", "tokenizer": "tensorboard",
             "train": "nothing"}[stage]
    assert not any(c.startswith(later) for c in _calls(pod))  # no stage after it ran


def test_the_watchdog_kills_a_trainer_deaf_to_sigterm(pod: dict) -> None:
    result = _boot(pod, FAKE_HANG="deaf", BOOT_WATCHDOG_MINUTES="0.05", BOOT_WATCHDOG_KILL_S="1")
    assert result.returncode == 124, result.stdout
    assert "orchestrate ignored TERM" in _calls(pod)
    assert "watchdog: still running 1s after SIGTERM: SIGKILL" in result.stdout
    sleeper = int(Path(pod["env"]["FAKE_LOG"] + ".sleeper").read_text())
    assert not _pid_alive(sleeper)  # the whole process group, not just orchestrate


def test_logged_steps_keep_the_watchdog_quiet(pod: dict) -> None:
    result = _boot(pod, FAKE_STEPS="6", BOOT_WATCHDOG_MINUTES="0.05")  # 6 s of steps, 3 s limit
    assert result.returncode == 0, result.stdout
    assert "watchdog:" not in result.stdout.replace("watchdog: 0.05 min", "")
    assert "boot finished: training is complete" in result.stdout


def test_spot_grace_reaches_the_trainer_config(pod: dict) -> None:
    assert _boot(pod, RUN_PREEMPTION_GRACE_S="5").returncode == 0
    runs = [c for c in _calls(pod) if c.startswith("orchestrate")]
    assert len(runs) == 2 and all("preemption_grace_s=5" in c.split() for c in runs)
    result = _boot(pod, RUN_PREEMPTION_GRACE_S="five")
    assert result.returncode == 2 and "RUN_PREEMPTION_GRACE_S='five' must be a number" in result.stdout


def test_an_unresolved_secret_reference_is_unset_with_one_warning(pod: dict) -> None:
    result = _boot(pod, HF_TOKEN="{{ RUNPOD_SECRET_hf_token }}",
                   WANDB_API_KEY="{{RUNPOD_SECRET_wandb}}")
    assert result.returncode == 0, result.stdout
    warnings = [line for line in result.stdout.splitlines() if "warning: unset" in line]
    assert len(warnings) == 1 and "HF_TOKEN" in warnings[0] and "WANDB_API_KEY" in warnings[0]
    assert "HF token: unset" in result.stdout
    seen = Path(pod["env"]["FAKE_LOG"] + ".env").read_text()
    assert "RUNPOD_SECRET" not in seen and "HF_TOKEN=" not in seen


# -- stopping the pod: the deadline and the stop chain -------------------------------------------

POD_KEY = "rpa_" + "K" * 40  # shaped like a RunPod key; must never reach a log


class _PodActions(BaseHTTPRequestHandler):
    """REST v2's `POST /v2/pods/{id}/action` as runpod/docs api-reference-v2/openapi.json (2026-08)
    specifies it: bearer auth, a body of exactly {"action": <PodAction>} (additionalProperties
    false), 200 with the pod, 401/422 as application/problem+json."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, dict(self.headers), body))
        match = re.fullmatch(r"/v2/pods/([^/]+)/action", self.path)
        if self.headers.get("Authorization") != f"Bearer {POD_KEY}":
            return self._reply(401, {"title": "Unauthorized", "status": 401, "detail": "missing bearer token"})
        try:
            request = json.loads(body)
        except ValueError:
            return self._reply(400, {"title": "Bad Request", "status": 400, "detail": "invalid JSON"})
        if (not match or not isinstance(request, dict) or set(request) != {"action"}
                or request["action"] not in ("start", "stop", "restart", "terminate")):
            return self._reply(422, {"title": "Unprocessable Entity", "status": 422,
                                     "detail": "Request validation failed."})
        self._reply(200, {"id": match[1], "status": "EXITED", "env": {"HF_TOKEN": SECRET}})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "application/problem+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def rest() -> Iterator[ThreadingHTTPServer]:
    """A loopback REST v2 endpoint; its `requests` lists (path, headers, body) as received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PodActions)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_port}"
    yield server
    server.shutdown()
    server.server_close()


def _stopped(pod: dict, rest: ThreadingHTTPServer, mode: str) -> bool:
    """Whether the way `mode` leaves to stop the pod was taken."""
    if mode in ("both-fail", "absent"):
        return bool(rest.requests)
    return any(c.startswith("runpodctl " + ("pod stop" if mode == "ok" else "stop pod")) for c in _calls(pod))


STOP_CHAIN = [  # FAKE_RUNPODCTL -> the runpodctl calls made and whether REST v2 was reached
    ("ok", ["runpodctl pod stop abc123pod"], False),
    ("v1-retired", ["runpodctl pod stop abc123pod", "runpodctl stop pod abc123pod"], False),
    ("both-fail", ["runpodctl pod stop abc123pod", "runpodctl stop pod abc123pod"], True),
    ("absent", [], True),
]


def _check_stop_chain(pod: dict, rest: ThreadingHTTPServer, runpodctl: list[str], via_rest: bool,
                      out: str) -> None:
    assert [c for c in _calls(pod) if c.startswith("runpodctl")] == runpodctl
    if via_rest:
        (path, headers, body), = rest.requests
        assert path == "/v2/pods/abc123pod/action" and json.loads(body) == {"action": "stop"}
        assert headers["Content-Type"] == "application/json"
    else:
        assert rest.requests == []
    assert POD_KEY not in out and SECRET not in out  # neither the key nor the pod's env is echoed


def _prepare_chain(pod: dict, rest: ThreadingHTTPServer, mode: str) -> dict[str, str]:
    if mode == "absent":
        (pod["bin"] / "runpodctl").unlink()
    return {"FAKE_RUNPODCTL": mode, "RUNPOD_POD_ID": "abc123pod", "RUNPOD_API_KEY": POD_KEY,
            "RUNPOD_API_BASE_URL": rest.url}


@pytest.mark.parametrize(("mode", "runpodctl", "via_rest"), STOP_CHAIN)
def test_a_deadline_in_the_past_stops_the_pod_through_the_stop_chain(
        pod: dict, rest: ThreadingHTTPServer, mode: str, runpodctl: list[str], via_rest: bool) -> None:
    env = _prepare_chain(pod, rest, mode)
    proc = _spawn(pod, FAKE_HANG="1", RUN_DEADLINE=str(int(time.time()) - 60), **env)
    deadline = time.monotonic() + 30
    while not _stopped(pod, rest, mode):
        assert proc.poll() is None and time.monotonic() < deadline, "the pod was not stopped"
        time.sleep(0.05)
    _wait_for_log(pod, " accepted", proc)
    status, out = _end(proc)  # RunPod's SIGTERM after the stop
    assert status == 143
    log = (pod["run_dir"] / "boot.log").read_text()
    assert "deadline: RUN_DEADLINE reached (maxRuntimeHours)" in log and " accepted" in log
    first = [line for line in log.splitlines() if " boot: " in line][:2]
    assert "---- boot of experiment" in first[0] and "deadline: the pod stops at" in first[1]
    _check_stop_chain(pod, rest, runpodctl, via_rest, out + log)


def test_a_deadline_ahead_stops_the_pod_once_it_passes(pod: dict) -> None:
    ends = int(time.time()) + 3
    proc = _spawn(pod, FAKE_HANG="1", RUN_DEADLINE=str(ends), RUNPOD_POD_ID="abc123pod")
    _wait_for_call(pod, "runpodctl pod stop abc123pod", proc)
    _end(proc)
    log = (pod["run_dir"] / "boot.log").read_text()
    reached = next(line for line in log.splitlines() if "deadline: RUN_DEADLINE reached" in line)
    stamp = time.mktime(time.strptime(reached[:20], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert stamp >= ends  # not a second early
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ends)) in log  # announced at boot


def test_a_bad_deadline_is_refused_and_the_pod_stopped(pod: dict) -> None:
    proc = _spawn(pod, RUN_DEADLINE="72h", BOOT_HALT="stop", RUNPOD_POD_ID="abc123pod")
    _wait_for_call(pod, "runpodctl pod stop abc123pod", proc)
    status, out = _end(proc)
    assert "RUN_DEADLINE='72h' must be Unix seconds" in out
    assert not any(c.startswith(("orchestrate", "pip")) for c in _calls(pod))


@pytest.mark.parametrize(("mode", "runpodctl", "via_rest"), STOP_CHAIN)
def test_a_repository_that_cannot_be_fetched_stops_the_pod(
        pod: dict, rest: ThreadingHTTPServer, mode: str, runpodctl: list[str], via_rest: bool) -> None:
    """The manifest's start command itself: no clone, no checkout, so no idle GPU either."""
    command = yaml.safe_load((BOOT.parent / "runpod-pod.yaml").read_text())["command"]
    env = {**pod["env"], "RUN_REPO": f"file://{pod['tmp']}/no-such-repo.git", "RUN_REF": "v1",
           "PODTRAIN_PROJECT": str(pod["tmp"] / "volume" / "transformer"),
           **_prepare_chain(pod, rest, mode)}
    proc = subprocess.Popen(["bash", "-c", command], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not _stopped(pod, rest, mode):
        assert proc.poll() is None and time.monotonic() < deadline, "the pod was not stopped"
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None  # asleep until RunPod stops it: no exit, so no restart loop
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=20)
    assert "bootstrap: cannot fetch RUN_REPO or check out RUN_REF v1" in out
    _check_stop_chain(pod, rest, runpodctl, via_rest, out)


def test_a_repository_url_with_a_password_is_refused_unprinted(pod: dict) -> None:
    """The token belongs in GIT_TOKEN (a RunPod secret), never in RUN_REPO, where git would keep
    it in .git/config on the volume."""
    command = yaml.safe_load((BOOT.parent / "runpod-pod.yaml").read_text())["command"]
    token = "ghp_" + "R" * 36
    project = pod["tmp"] / "volume" / "transformer"
    env = {**pod["env"], "RUN_REPO": f"https://x-access-token:{token}@github.com/o/r.git",
           "RUN_REF": "main", "PODTRAIN_PROJECT": str(project), "RUNPOD_POD_ID": "abc123pod"}
    proc = subprocess.Popen(["bash", "-c", command], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_call(pod, "runpodctl pod stop abc123pod", proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=20)
    assert "bootstrap: RUN_REPO carries a password: put the token in GIT_TOKEN" in out
    assert token not in out and not project.exists()  # nothing cloned, nothing written


def _manifest(pod: dict, complete: bool) -> None:
    train = pod["root"] / "datasets" / "train" / "tiny-exp"
    train.mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({"shards": [], "complete": complete}))


@pytest.mark.parametrize(("shards", "sharded"), [(None, True), ("complete", False), ("partial", True)])
def test_run_shard_auto_shards_unless_the_volume_has_complete_shards(pod: dict, shards: str | None,
                                                                     sharded: bool) -> None:
    env = dict(pod["env"])
    del env["RUN_SHARD"]  # the shipped manifest leaves it unset
    pod["env"] = env
    if shards:
        _manifest(pod, complete=shards == "complete")
    result = _boot(pod)
    assert result.returncode == 0, result.stdout
    assert any(c.startswith("fineweb-sharder") for c in _calls(pod)) == sharded
    assert ("stage shard: skipped (RUN_SHARD=auto)" in result.stdout) == (not sharded)


def test_a_refused_deadline_stop_is_retried_until_it_is_accepted(pod: dict) -> None:
    (pod["bin"] / "runpodctl").unlink()  # no way to stop the pod yet (and no RUNPOD_API_KEY)
    proc = _spawn(pod, FAKE_HANG="1", RUN_DEADLINE=str(int(time.time()) - 1),
                  RUNPOD_POD_ID="abc123pod", BOOT_STOP_RETRY_S="1")
    _wait_for_log(pod, "stopping pod abc123pod failed; again in 1s", proc)
    _write(pod["bin"] / "runpodctl", RUNPODCTL)  # the next round finds a way
    _wait_for_log(pod, "stop: 'runpodctl pod stop abc123pod' accepted", proc)
    _end(proc)


def test_outside_runpod_the_deadline_ends_the_boot_as_a_stop_would(pod: dict) -> None:
    proc = _spawn(pod, FAKE_HANG="1", RUN_DEADLINE=str(int(time.time()) - 1))  # no RUNPOD_POD_ID
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "deadline: no RUNPOD_POD_ID: ending the boot (SIGTERM) instead" in out
    assert not (pod["run_dir"] / "BOOT_FAILED").exists()  # time is up: not a failure


@pytest.mark.parametrize("experiment, expected", [("runpod-2b", "configs/runpod_2b.yaml"),
                                                  ("runpod-8b", "configs/runpod_1b.yaml"),  # no such config
                                                  ("my-run", "configs/runpod_1b.yaml")])
def test_run_experiment_alone_picks_the_config_of_its_size(pod: dict, experiment: str, expected: str) -> None:
    """RUN_EXPERIMENT=runpod-2b without RUN_CONFIG trains configs/runpod_2b.yaml, never the 1B model under a 2B name."""
    configs = Path(pod["env"]["PODTRAIN_PROJECT"]) / "configs"
    for name in ("runpod_1b.yaml", "runpod_2b.yaml"):
        (configs / name).write_text("num_steps: 2\n")
    env = {k: v for k, v in pod["env"].items() if k != "RUN_CONFIG"}
    result = subprocess.run(["bash", str(BOOT)], env={**env, "RUN_EXPERIMENT": experiment}, capture_output=True,
                            text=True, timeout=60, cwd=pod["tmp"])
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [c for c in _calls(pod) if c.startswith("orchestrate")]
    assert runs and all(f"--config {expected} " in c for c in runs)

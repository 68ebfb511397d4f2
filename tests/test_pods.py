"""`orchestrate pod|volume ...` through the real runpod SDK and podtrain's own GraphQL writes, against a
fake RunPod GraphQL API on loopback.

The CLI runs as a subprocess with HOME pointed at a temporary folder (the SDK reads
~/.runpod/config.toml at import) and RUNPOD_API_BASE_URL at the fake (read on every call), so the
bytes checked here are the bytes that would go to api.runpod.io. Every run also checks that the API
key never appears in stdout or stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from fake_runpod import FakeRunPod
from orchestrator.pods.manifest import ManifestError, PodManifest, load_manifest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "infra" / "runpod-pod.yaml"
KEY = "rp-test-key-5b1e9c0d7a"
Run = subprocess.CompletedProcess
VOLUME = "vol9test42"  # the fake account's volume, in data center EU-RO-1
LITERAL = "hf_" + "x" * 34  # shaped like a Hugging Face token
REPO_URL = "https://example.org/podtrain.git"
# The ref the pod runs: a commit of this repository, so RUN_CONFIG is checked in its tree.
HEAD = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                      text=True, check=True).stdout.strip()


@pytest.fixture
def api():
    with FakeRunPod(KEY) as fake:
        yield fake


def _manifest(tmp_path: Path, env: dict[str, Any] | None = None, **changes: Any) -> Path:
    """The shipped manifest with the volume set (and any changes), written to a temp file."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["volumeMounts"][0]["volumeName"] = VOLUME
    data["env"].update(RUN_REPO=REPO_URL, RUN_REF=HEAD)
    data.update(changes)
    data["env"].update(env or {})
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cli(tmp_path: Path, api: FakeRunPod, *args: str, key: str = KEY, bin_dir: Path | None = None) -> Run:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(HOME=str(home), RUNPOD_API_BASE_URL=api.url)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if key:
        env["RUNPOD_API_KEY"] = key
    result = subprocess.run([sys.executable, "-m", "orchestrator.pods.cli", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert KEY not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def _use_fake(api: FakeRunPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's SDK at the fake (HOME first: the SDK reads its config at import)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)


def _one_error_line(result: Run) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _env(inp: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in inp["env"]}


def test_create_sends_every_manifest_field(api: FakeRunPod, tmp_path: Path) -> None:
    shipped = yaml.safe_load(SHIPPED.read_text())
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = _cli(tmp_path, api, "create", "-f", str(_manifest(tmp_path)))
    assert result.returncode == 0, result.stderr

    (create,) = api.find("podFindAndDeployOnDemand")
    assert not api.find("podRentInterruptable")
    assert "$input" in create.query and set(create.variables) == {"input"}  # values as variables
    inp = create.input
    assert inp["name"] == "podtrain-runpod-1b"
    assert inp["imageName"] == shipped["image"]
    assert (inp["gpuTypeId"], inp["gpuCount"]) == (shipped["gpuType"][0], shipped["gpuCount"])
    assert inp["cloudType"] == "SECURE"
    # Safety rails: the image's CUDA 12.8 or newer only; RunPod stops it after maxRuntimeHours.
    assert inp["allowedCudaVersions"] == ["12.8", "12.9", "13.0"]
    stop_after = datetime.strptime(inp["stopAfter"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert timedelta(hours=72) <= stop_after - before <= timedelta(hours=72, minutes=5)
    assert "terminateAfter" not in inp
    assert inp["containerDiskInGb"] == shipped["containerDiskInGb"]
    assert (inp["minVcpuCount"], inp["minMemoryInGb"]) == (8, 64)
    assert (inp["networkVolumeId"], inp["dataCenterId"]) == (VOLUME, "EU-RO-1")
    assert inp["volumeMountPath"] == "/workspace" and inp["volumeInGb"] == 0
    assert inp["ports"] == "6006/http,22/tcp"
    assert inp["dockerArgs"] == shipped["command"]
    assert 'exec bash "$P/infra/boot.sh"' in inp["dockerArgs"]  # run for real in test_boot_e2e
    assert inp["startSsh"] is True and inp["supportPublicIp"] is True
    expected = {**{k: str(v) for k, v in shipped["env"].items()}, "RUN_REPO": REPO_URL,
                "RUN_REF": HEAD, "RUN_VOLUME_ID": VOLUME, "BOOT_WATCHDOG_MINUTES": "30"}
    assert _env(inp) == expected
    assert _env(inp)["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    # The GPU types, the volume's data center and the running pods were looked up first, with the key.
    assert api.operations() == ["gpuTypes"] * 3 + ["myself", "myself", "podFindAndDeployOnDemand"]
    assert {r.authorization for r in api.requests} == {f"Bearer {KEY}"}

    pod_id = next(iter(api.pods))
    out = result.stdout
    assert f"Created pod {pod_id} 'podtrain-runpod-1b'" in out and "about $1.64/h" in out
    assert f"orchestrate pod logs {pod_id} --follow" in out and "runpodctl" not in out
    assert f"RunPod stops it at {inp['stopAfter']}" in out
    assert f"ssh {pod_id}-64410e5c@ssh.runpod.io" in out
    assert f"https://{pod_id}-6006.proxy.runpod.net" in out


def test_spot_goes_through_pod_rent_interruptable_with_overrides(
    api: FakeRunPod, tmp_path: Path
) -> None:
    path = _manifest(tmp_path, spot=True, bidPerGpu=0.9, cloudType="community", gpuCount=2,
                     terminateAfterHours=100, maxRuntimeHours=12)
    result = _cli(tmp_path, api, "create", "-f", str(path), "--config", "configs/runpod_2b.yaml",
                  "--experiment", "runpod-2b", "--shard", "--shard-lines", "5000")
    assert result.returncode == 0, result.stderr

    assert not api.find("podFindAndDeployOnDemand")
    (rent,) = api.find("podRentInterruptable")
    inp = rent.input
    assert inp["bidPerGpu"] == 0.9 and inp["cloudType"] == "COMMUNITY" and inp["gpuCount"] == 2
    assert inp["name"] == "podtrain-runpod-2b"
    assert (inp["networkVolumeId"], inp["dataCenterId"], inp["volumeMountPath"]) == (
        VOLUME, "EU-RO-1", "/workspace")
    env = _env(inp)
    assert (env["RUN_CONFIG"], env["RUN_EXPERIMENT"], env["RUN_SHARD"], env["SHARD_LINES"]) == (
        "configs/runpod_2b.yaml", "runpod-2b", "1", "5000")
    assert env["RUN_PREEMPTION_GRACE_S"] == "5"  # boot.sh passes it as preemption_grace_s=5
    created = datetime.now(timezone.utc)
    for key, hours in (("stopAfter", 12), ("terminateAfter", 100)):
        when = datetime.strptime(inp[key], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        assert abs(when - created - timedelta(hours=hours)) < timedelta(minutes=5), key
    assert inp["allowedCudaVersions"] == ["12.8", "12.9", "13.0"]
    assert next(iter(api.pods.values()))["podType"] == "INTERRUPTABLE"
    assert "spot, about $1.80/h" in result.stdout
    assert "/workspace/runs/runpod-2b/boot.log" in result.stdout


def test_dry_run_prints_the_request_and_creates_nothing(api: FakeRunPod, tmp_path: Path) -> None:
    path = str(_manifest(tmp_path))
    result = _cli(tmp_path, api, "create", "-f", path, "--dry-run", "--experiment", "runpod-2b")
    assert result.returncode == 0, result.stderr
    assert set(api.operations()) == {"gpuTypes", "myself"}  # read-only lookups, no mutation
    out = result.stdout
    sent = json.loads(out[out.index("\n{") + 1:out.rindex("\n}") + 2])  # the body, between comments
    inp = sent["variables"]["input"]
    assert sent["query"].startswith("mutation deploy($input: PodFindAndDeployOnDemandInput!)")
    assert (inp["dataCenterId"], inp["volumeMountPath"]) == ("EU-RO-1", "/workspace")
    assert {"key": "RUN_EXPERIMENT", "value": "runpod-2b"} in inp["env"]
    assert {"key": "HF_TOKEN", "value": "{{ RUNPOD_SECRET_hf_token }}"} in inp["env"]
    assert "# price: about $1.64/h" in out

    api.requests.clear()
    offline = _cli(tmp_path, api, "create", "-f", path, "--dry-run", key="")
    assert offline.returncode == 0, offline.stderr
    assert api.requests == []  # without a key nothing at all is sent
    assert "dataCenterId: filled in at create time" in offline.stdout


def test_list_get_stop_delete(api: FakeRunPod, tmp_path: Path) -> None:
    pod = api.add_pod(name="podtrain-runpod-1b",
                      env=[{"key": "HF_TOKEN", "value": LITERAL},
                           {"key": "RUN_EXPERIMENT", "value": "runpod-1b"}])
    pod_id = pod["id"]

    listed = _cli(tmp_path, api, "list")
    assert listed.returncode == 0 and pod_id in listed.stdout and "RUNNING" in listed.stdout

    got = _cli(tmp_path, api, "get", pod_id)
    assert got.returncode == 0, got.stderr
    assert "ssh root@203.0.113.7 -p 40022" in got.stdout
    assert f"https://{pod_id}-6006.proxy.runpod.net" in got.stdout
    assert "HF_TOKEN=<hidden>" in got.stdout and LITERAL not in got.stdout
    assert "RUN_EXPERIMENT=runpod-1b" in got.stdout
    as_json = json.loads(_cli(tmp_path, api, "get", pod_id, "--json").stdout)
    assert as_json["id"] == pod_id and as_json["env"] == ["HF_TOKEN=<hidden>",
                                                          "RUN_EXPERIMENT=runpod-1b"]

    stopped = _cli(tmp_path, api, "stop", pod_id)
    assert stopped.returncode == 0 and "EXITED" in stopped.stdout
    assert api.pods[pod_id]["desiredStatus"] == "EXITED"

    deleted = _cli(tmp_path, api, "delete", pod_id)
    assert deleted.returncode == 0 and api.pods == {}
    assert [r.operation for r in api.requests] == ["myself", "pod", "pod", "podStop",
                                                   "podTerminate"]


# A stand-in for `ssh` that records its argv and answers the remote `tail` from local files.
FAKE_SSH = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_SSH_LOG"
for last; do :; done
case "$last" in
  *metrics.jsonl*) cat "$FAKE_SSH_DIR/metrics.jsonl" ;;
  *boot.log*) cat "$FAKE_SSH_DIR/boot.log" ;;
esac
"""


def test_status_and_logs_read_the_pod_over_ssh(api: FakeRunPod, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 41, "loss": 3.5}\n{"step": 42, "val_loss": 3.9}\n{"step": 42, "loss": 3.25}\n')
    (tmp_path / "boot.log").write_text("2026-01-01T00:00:00Z boot: stage train: start\n")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh.args"))
    monkeypatch.setenv("FAKE_SSH_DIR", str(tmp_path))
    pod = api.add_pod(name="podtrain-exp1", uptimeSeconds=9000, costPerHr=1.64,
                      env=[{"key": "RUN_EXPERIMENT", "value": "exp1"}])

    status = _cli(tmp_path, api, "status", "podtrain-exp1", bin_dir=bin_dir)  # by name
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "RUNNING" in out and "2h30m" in out and "$4.10 so far at $1.64/h" in out
    assert "step 42, loss 3.2500" in out
    assert f"https://{pod['id']}-6006.proxy.runpod.net" in out
    args = (tmp_path / "ssh.args").read_text().splitlines()
    assert args[:2] == ["-p", "40022"] and "root@203.0.113.7" in args
    assert args[-1] == "tail -n 50 /workspace/runs/exp1/checkpoints/metrics.jsonl"

    logs = _cli(tmp_path, api, "logs", pod["id"], "--follow", "-n", "20", bin_dir=bin_dir)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "2026-01-01T00:00:00Z boot: stage train: start\n"
    last = (tmp_path / "ssh.args").read_text().splitlines()[-1]
    assert last == "tail -n 20 -F /workspace/runs/exp1/boot.log"

    # A pod that does not run yet has no SSH address: logs says so, status shows the rest.
    _use_fake(api, tmp_path, monkeypatch)
    from orchestrator.pods import api as pods, remote

    api.pods[pod["id"]]["runtime"] = None
    waiting = pods.find_pod(pod["id"])
    with pytest.raises(pods.PodError, match="no direct SSH yet"):
        remote.boot_log_command(waiting, 10, follow=False)
    assert remote.last_logged_step(waiting) is None
    with pytest.raises(pods.PodError, match="'nope': no pod with that id or name"):
        pods.find_pod("nope")


def test_volume_create_and_list(api: FakeRunPod, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    created = _cli(tmp_path, api, "volume", "create", "--name", 'data "2"', "--size", "500",
                   "--data-center", "EU-RO-1")
    assert created.returncode == 0, created.stderr
    (request,) = api.find("createNetworkVolume")
    assert request.input == {"name": 'data "2"', "size": 500, "dataCenterId": "EU-RO-1"}
    volume_id = api.volumes[-1]["id"]
    assert f"volumeMounts[0].volumeName: {volume_id}" in created.stdout
    _use_fake(api, tmp_path, monkeypatch)
    from orchestrator.pods import api as pods

    assert [v["id"] for v in pods.list_volumes()] == [VOLUME, volume_id]


def test_a_bad_api_key_is_one_line_and_exit_1(api: FakeRunPod, tmp_path: Path) -> None:
    line = _one_error_line(_cli(tmp_path, api, "list", key="not-the-key"))
    assert "RunPod rejected the API key" in line and "RUNPOD_API_KEY" in line
    assert "not-the-key" not in line


def test_no_capacity_is_one_line_and_exit_1(api: FakeRunPod, tmp_path: Path) -> None:
    api.capacity = False
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(_manifest(tmp_path))))
    assert "no longer any instances available" in line and "no capacity: try" in line
    assert api.pods == {}


def test_quotes_backslashes_and_newlines_arrive_unchanged(api: FakeRunPod, tmp_path: Path) -> None:
    note = 'say "hi" from C:\\temp\\new\nsecond line\twith a tab and a \\" pair'
    command = "bash -c 'echo \"$RUN_EXPERIMENT\" \\\n  && exec bash /workspace/transformer/infra/boot.sh'"
    path = _manifest(tmp_path, env={"NOTE": note}, command=command, name='podtrain "{experiment}"')
    result = _cli(tmp_path, api, "create", "-f", str(path))
    assert result.returncode == 0, result.stderr
    (create,) = api.find("podFindAndDeployOnDemand")
    assert note not in create.query and command not in create.query  # data, not query text
    assert _env(create.input)["NOTE"] == note
    assert create.input["dockerArgs"] == command
    assert create.input["name"] == 'podtrain "runpod-1b"'
    assert next(iter(api.pods.values()))["dockerArgs"] == command


@pytest.mark.parametrize("where", ["command", "name", "image", "env"])
def test_a_token_anywhere_is_refused_before_anything_is_sent(
    api: FakeRunPod, tmp_path: Path, where: str
) -> None:
    changes = {
        "command": {"command": f"bash -c 'export HF_TOKEN={LITERAL}; exec bash boot.sh'"},
        "name": {"name": f"pod-{LITERAL}"},
        "image": {"image": f"ghcr.io/me/podtrain:{LITERAL}"},
        "env": {"env": {"MIRROR": f"https://u:{LITERAL}@example.org"}},
    }[where]
    path = _manifest(tmp_path, **changes)
    for args in (["create", "-f", str(path)], ["create", "-f", str(path), "--dry-run"]):
        result = _cli(tmp_path, api, *args)
        line = _one_error_line(result)
        key = "env.MIRROR" if where == "env" else where
        assert line.startswith(f"error: {path}: {key}: looks like a literal access token"), line
        assert LITERAL not in result.stdout + result.stderr
    assert api.requests == []


def test_a_second_pod_for_a_running_experiment_is_refused(
    api: FakeRunPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = api.add_pod(name="podtrain-runpod-1b", env=[
        {"key": "RUN_EXPERIMENT", "value": "runpod-1b"}, {"key": "RUN_VOLUME_ID", "value": VOLUME}])
    path = _manifest(tmp_path)
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(path)))
    assert f"pod {twin['id']} (podtrain-runpod-1b, RUNNING) already runs experiment 'runpod-1b' " \
           f"on volume {VOLUME}" in line and "--force" in line
    assert not api.find("podFindAndDeployOnDemand") and len(api.pods) == 1

    # In process from here (the same HTTP): another experiment on the volume is fine, so is this
    # one with --force, and so is this one once the twin is stopped.
    _use_fake(api, tmp_path, monkeypatch)
    from orchestrator.pods import api as pods

    manifest = load_manifest(path)
    pods.create_pod(manifest.with_overrides(experiment="runpod-2b"))
    pods.create_pod(manifest, force=True)
    api.pods[twin["id"]]["desiredStatus"] = "EXITED"
    api.pods.pop(next(i for i, p in api.pods.items() if p["name"] == "podtrain-runpod-1b"
                      and i != twin["id"]))
    pods.create_pod(manifest)
    assert len(api.find("podFindAndDeployOnDemand")) == 3


def test_gpu_types_are_tried_in_order_on_no_capacity(api: FakeRunPod, tmp_path: Path) -> None:
    api.full_gpu_types = {"NVIDIA A100 80GB PCIe"}
    path = _manifest(tmp_path, gpuType=["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"])
    result = _cli(tmp_path, api, "create", "-f", str(path))
    assert result.returncode == 0, result.stderr
    tried = [r.input["gpuTypeId"] for r in api.find("podFindAndDeployOnDemand")]
    assert tried == ["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"]
    assert "1 x NVIDIA H100 80GB HBM3" in result.stdout and "about $2.99/h" in result.stdout

    api.requests.clear()
    api.full_gpu_types.add("NVIDIA H100 80GB HBM3")
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(path), "--force"))
    assert "no longer any instances available" in line
    assert "also no capacity for: NVIDIA A100 80GB PCIe" in line
    assert len(api.find("podFindAndDeployOnDemand")) == 2


def test_shipped_manifest_names_the_placeholder_volume(api: FakeRunPod, tmp_path: Path) -> None:
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(SHIPPED), "--dry-run"))
    assert line == (
        f"error: {SHIPPED}: volumeMounts[0].volumeName: set your network volume id (placeholder "
        "'YOUR_VOLUME_ID'); find it with `orchestrate volume list` or the console's "
        "Storage page"
    )
    assert api.requests == []


# -- manifest validation, in process -------------------------------------------------------


def _load(tmp_path: Path, mutate) -> PodManifest:
    data = yaml.safe_load(SHIPPED.read_text())
    data["volumeMounts"][0]["volumeName"] = VOLUME
    data["env"].update(RUN_REPO=REPO_URL, RUN_REF=HEAD)
    mutate(data)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_manifest(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(gpu_type="x"), "gpu_type: unknown key (did you mean 'gpuType'?)"),
        (lambda d: d["volumeMounts"][0].update(size=5), "volumeMounts[0].size: unknown key"),
        (lambda d: d.pop("volumeMounts"), "volumeMounts: required key is missing"),
        (lambda d: d["volumeMounts"][0].pop("volumeName"),
         "volumeMounts[0].volumeName: required key is missing"),
        (lambda d: d["volumeMounts"][0].update(mountPath="/runpod-volume"),
         "volumeMounts[0].mountPath: must be /workspace"),
        (lambda d: d["env"].update(HF_TOKEN=LITERAL), "env.HF_TOKEN: looks like a literal access"),
        (lambda d: d["env"].update(HF_TOKEN="plain"),
         "env.HF_TOKEN: a secret must be a RunPod secret reference"),
        (lambda d: d["env"].update(WANDB_API_KEY="abc123"),
         "env.WANDB_API_KEY: a secret must be a RunPod secret reference"),
        (lambda d: d["env"].update(MIRROR=f"https://u:{LITERAL}@example.org"),
         "env.MIRROR: looks like a literal access token"),
        (lambda d: d["env"].update({'BAD"NAME': "1"}), "env['BAD\"NAME']: is not a valid variable"),
        (lambda d: d["env"].update(RUN_SHARD="2"), "env.RUN_SHARD: must be '0' or '1'"),
        (lambda d: d["env"].update(SHARD_LINES="-5"), "env.SHARD_LINES: must be a positive"),
        (lambda d: d["env"].update(RUN_EXPERIMENT="a/b"), "env.RUN_EXPERIMENT: 'a/b' is not a"),
        (lambda d: d["env"].update(RUN_CONFIG="configs/nope.yaml"),
         f"env.RUN_CONFIG: configs/nope.yaml is not in RUN_REF {HEAD}; known there: "),
        (lambda d: d["env"].update(RUN_REF="no-such-ref-x"), "env.RUN_REF: 'no-such-ref-x' is not a"),
        (lambda d: d["env"].update(RUN_REF=""), "env.RUN_REF: set the commit or tag"),
        (lambda d: d["env"].pop("RUN_REPO"), "env.RUN_REPO: the command clones $RUN_REPO"),
        (lambda d: d["env"].update(RUN_REPO="https://github.com/YOUR_ORG/podtrain.git"),
         "env.RUN_REPO: set your podtrain repository"),
        (lambda d: d.update(image="ghcr.io/me/podtrain:latest"),
         "allowedCudaVersions: the image tag names no CUDA version"),
        (lambda d: d.update(allowedCudaVersions=["12.8", "9.9"]),
         "allowedCudaVersions[1]: '9.9' is not one of RunPod's CUDA versions"),
        (lambda d: d.update(terminateAfterHours=10), "terminateAfterHours: must not be shorter"),
        (lambda d: d.update(maxRuntimeHours=0), "maxRuntimeHours: Input should be greater than 0"),
        (lambda d: d.update(gpuType=["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]),
         "gpuType: lists a GPU type twice"),
        (lambda d: d["env"].update(RUN_SHARD=True), "env.RUN_SHARD: must be a string"),
        (lambda d: d.update(spot=True, bidPerGpu=None), "bidPerGpu: spot: true needs a bid"),
        (lambda d: d.update(ports=["6006/http", "22"]), "ports[1]: '22' is not PORT/http"),
        (lambda d: d.update(cloudType="cheap"), "cloudType: Input should be 'secure'"),
        (lambda d: d.update(command=f"export T={LITERAL}"), "command: looks like a literal access"),
        (lambda d: d.update(gpuCount=0), "gpuCount: Input should be greater than or equal to 1"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_key(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        _load(tmp_path, mutate)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'm.yaml'}: {message}"), text
    assert "\n" not in text and LITERAL not in text


def test_manifest_accepts_numbers_public_key_and_secret_references(tmp_path: Path) -> None:
    manifest = _load(tmp_path, lambda d: d["env"].update(
        RUN_SHARD=1, SHARD_LINES=1000, PUBLIC_KEY="ssh-ed25519 AAAAC3Nza user@laptop",
        HUGGINGFACEHUB_API_TOKEN="{{RUNPOD_SECRET_hf_token}}"))
    assert (manifest.env["RUN_SHARD"], manifest.env["SHARD_LINES"]) == ("1", "1000")
    assert manifest.gpu_types == ["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB",
                                  "NVIDIA H100 80GB HBM3"]
    pinned = _load(tmp_path, lambda d: d.update(image="me/podtrain:v3", gpuType="NVIDIA H100 80GB HBM3",
                                                allowedCudaVersions=["12.4", "12.8"]))
    assert pinned.cuda_versions == ["12.4", "12.8"] and pinned.gpu_types == ["NVIDIA H100 80GB HBM3"]
    assert manifest.volume_id == VOLUME and manifest.pod_name == "podtrain-runpod-1b"
    bigger = manifest.with_overrides(experiment="runpod-4b", config="configs/runpod_4b.yaml")
    assert bigger.pod_name == "podtrain-runpod-4b" and manifest.experiment == "runpod-1b"
    with pytest.raises(ManifestError, match="command line: env.SHARD_LINES"):
        manifest.with_overrides(shard_lines=0)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nimage: [unclosed\n")
    with pytest.raises(ManifestError, match=r"broken.yaml:3:1: invalid YAML"):
        load_manifest(path)


# -- the pods module, in process (HOME is a temp dir before the SDK is first imported) -------


@pytest.fixture
def sdk_env(api: FakeRunPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRunPod:
    _use_fake(api, tmp_path, monkeypatch)
    return api


def test_sdk_failures_become_one_line_pod_errors(sdk_env: FakeRunPod, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.pods import api as pods

    with pytest.raises(pods.PodError, match=r"gpuType: RunPod has no GPU type 'NVIDIA B9000'"):
        pods.create_pod(_load(tmp_path, lambda d: d.update(gpuType="NVIDIA B9000")))
    other_volume = _load(tmp_path, lambda d: d["volumeMounts"][0].update(volumeName="volOther1"))
    mine = r"\(yours: vol9test42 \(transformer-shared, EU-RO-1\)\)"
    with pytest.raises(pods.PodError, match=r"'volOther1' is not in this RunPod account " + mine):
        pods.create_pod(other_volume)
    with pytest.raises(pods.PodError, match=r"letters and digits only"):
        pods.get_pod('abc"def')
    assert not any(r.operation.startswith("pod") for r in sdk_env.requests)

    monkeypatch.setenv("RUNPOD_API_BASE_URL", "http://127.0.0.1:9")  # the discard port: closed
    with pytest.raises(pods.PodError, match=r"cannot list pods: no usable answer from the RunPod "
                                            r"API at http://127.0.0.1:9 \(ConnectionError\)"):
        pods.list_pods()
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert not pods.has_api_key()
    with pytest.raises(pods.PodError, match=r"RUNPOD_API_KEY is not set"):
        pods.list_pods()

"""`orchestrate pod ...` through the real runpod SDK, against a fake RunPod GraphQL API on loopback.

The CLI runs as a subprocess with HOME pointed at a temporary folder (the SDK reads
~/.runpod/config.toml at import) and RUNPOD_API_BASE_URL at the fake (the SDK reads it on every
call), so the bytes checked here are the bytes the SDK would send to api.runpod.io. Every run also
checks that the API key never appears in stdout or stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fake_runpod import Enum, FakeRunPod, parse
from orchestrator.pods.manifest import ManifestError, PodManifest, load_manifest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "infra" / "runpod-pod.yaml"
KEY = "rp-test-key-5b1e9c0d7a"
Run = subprocess.CompletedProcess
VOLUME = "vol9test42"  # the fake account's volume, in data center EU-RO-1
LITERAL = "hf_" + "x" * 34  # shaped like a Hugging Face token


@pytest.fixture
def api():
    with FakeRunPod(KEY) as fake:
        yield fake


def _manifest(tmp_path: Path, env: dict[str, Any] | None = None, **changes: Any) -> Path:
    """The shipped manifest with the volume set (and any changes), written to a temp file."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["volumeMounts"][0]["volumeName"] = VOLUME
    data.update(changes)
    data["env"].update(env or {})
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cli(tmp_path: Path, api: FakeRunPod, *args: str, key: str = KEY) -> Run:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(HOME=str(home), RUNPOD_API_BASE_URL=api.url)
    if key:
        env["RUNPOD_API_KEY"] = key
    result = subprocess.run([sys.executable, "-m", "orchestrator.pods.cli", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert KEY not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def _one_error_line(result: Run) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _env(inp: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in inp["env"]}


def test_create_sends_every_manifest_field(api: FakeRunPod, tmp_path: Path) -> None:
    shipped = yaml.safe_load(SHIPPED.read_text())
    result = _cli(tmp_path, api, "create", "-f", str(_manifest(tmp_path)))
    assert result.returncode == 0, result.stderr

    (create,) = api.find("podFindAndDeployOnDemand")
    assert not api.find("podRentInterruptable")
    inp = create.input
    assert inp["name"] == "podtrain-runpod-1b"
    assert inp["imageName"] == shipped["image"]
    assert (inp["gpuTypeId"], inp["gpuCount"]) == (shipped["gpuType"], shipped["gpuCount"])
    assert isinstance(inp["cloudType"], Enum) and inp["cloudType"] == "SECURE"
    assert inp["containerDiskInGb"] == shipped["containerDiskInGb"]
    assert (inp["minVcpuCount"], inp["minMemoryInGb"]) == (8, 64)
    assert (inp["networkVolumeId"], inp["dataCenterId"]) == (VOLUME, "EU-RO-1")
    assert inp["volumeMountPath"] == "/workspace" and inp["volumeInGb"] == 0
    assert inp["ports"] == "6006/http,22/tcp"
    assert inp["dockerArgs"] == shipped["command"]
    assert "exec bash /workspace/transformer/infra/boot.sh" in inp["dockerArgs"]
    assert inp["startSsh"] is True and inp["supportPublicIp"] is True
    assert _env(inp) == {k: str(v) for k, v in shipped["env"].items()}
    assert _env(inp)["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    # The GPU type and the volume's data center were looked up first, all with the key.
    assert {"gpuTypes", "myself"} <= set(api.operations()[:2])
    assert {r.authorization for r in api.requests} == {f"Bearer {KEY}"}

    pod_id = next(iter(api.pods))
    out = result.stdout
    assert f"Created pod {pod_id} 'podtrain-runpod-1b'" in out and "about $1.64/h" in out
    assert f"runpodctl pod logs {pod_id} --follow" in out
    assert f"ssh {pod_id}-64410e5c@ssh.runpod.io" in out
    assert f"https://{pod_id}-6006.proxy.runpod.net" in out


def test_spot_goes_through_pod_rent_interruptable_with_overrides(
    api: FakeRunPod, tmp_path: Path
) -> None:
    path = _manifest(tmp_path, spot=True, bidPerGpu=0.9, cloudType="community", gpuCount=2)
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
    assert next(iter(api.pods.values()))["podType"] == "INTERRUPTABLE"
    assert "spot, about $1.80/h" in result.stdout
    assert "/workspace/runs/runpod-2b/boot.log" in result.stdout


def test_dry_run_prints_the_request_and_creates_nothing(api: FakeRunPod, tmp_path: Path) -> None:
    path = str(_manifest(tmp_path))
    result = _cli(tmp_path, api, "create", "-f", path, "--dry-run", "--experiment", "runpod-2b")
    assert result.returncode == 0, result.stderr
    assert set(api.operations()) == {"gpuTypes", "myself"}  # read-only lookups, no mutation
    out = result.stdout
    for text in ('"image_name": "runpod/pytorch:', '"data_center_id": "EU-RO-1"',
                 '"volume_mount_path": "/workspace"', '"RUN_EXPERIMENT": "runpod-2b"',
                 '"HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}"', "runpod.create_pod(**{"):
        assert text in out, text

    api.requests.clear()
    offline = _cli(tmp_path, api, "create", "-f", path, "--dry-run", key="")
    assert offline.returncode == 0, offline.stderr
    assert api.requests == []  # without a key nothing at all is sent
    assert "data_center_id: filled in at create time" in offline.stdout


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


def test_a_bad_api_key_is_one_line_and_exit_1(api: FakeRunPod, tmp_path: Path) -> None:
    line = _one_error_line(_cli(tmp_path, api, "list", key="not-the-key"))
    assert "RunPod rejected the API key" in line and "RUNPOD_API_KEY" in line
    assert "not-the-key" not in line


def test_no_capacity_is_one_line_and_exit_1(api: FakeRunPod, tmp_path: Path) -> None:
    api.capacity = False
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(_manifest(tmp_path))))
    assert "no longer any instances available" in line and "no capacity: try" in line
    assert api.pods == {}


@pytest.mark.parametrize(("planted", "what"), [('say "hi"', "a double quote"),
                                              ("C:\\temp", "a backslash"),
                                              ("two\nlines", "a newline")])
def test_unsafe_env_value_is_refused_before_any_request(
    api: FakeRunPod, tmp_path: Path, planted: str, what: str
) -> None:
    path = _manifest(tmp_path, env={"NOTE": planted})
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(path)))
    assert line.startswith(f"error: {path}: env.NOTE: contains {what}")
    assert api.requests == []


def test_shipped_manifest_names_the_placeholder_volume(api: FakeRunPod, tmp_path: Path) -> None:
    line = _one_error_line(_cli(tmp_path, api, "create", "-f", str(SHIPPED), "--dry-run"))
    assert line == (
        f"error: {SHIPPED}: volumeMounts[0].volumeName: set your network volume id (placeholder "
        "'YOUR_VOLUME_ID'); find it with `runpodctl network-volume list` or the console's "
        "Storage page"
    )
    assert api.requests == []


# -- manifest validation, in process -------------------------------------------------------


def _load(tmp_path: Path, mutate) -> PodManifest:
    data = yaml.safe_load(SHIPPED.read_text())
    data["volumeMounts"][0]["volumeName"] = VOLUME
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
        (lambda d: d["env"].update(HF_TOKEN=LITERAL),
         "env.HF_TOKEN: a secret must be a RunPod secret reference"),
        (lambda d: d["env"].update(WANDB_API_KEY="abc123"),
         "env.WANDB_API_KEY: a secret must be a RunPod secret reference"),
        (lambda d: d["env"].update(MIRROR=f"https://u:{LITERAL}@example.org"),
         "env.MIRROR: looks like a literal access token"),
        (lambda d: d["env"].update({'BAD"NAME': "1"}), "env['BAD\"NAME']: contains a double quote"),
        (lambda d: d["env"].update(RUN_SHARD="2"), "env.RUN_SHARD: must be '0' or '1'"),
        (lambda d: d["env"].update(SHARD_LINES="-5"), "env.SHARD_LINES: must be a positive"),
        (lambda d: d["env"].update(RUN_EXPERIMENT="a/b"), "env.RUN_EXPERIMENT: 'a/b' is not a"),
        (lambda d: d["env"].update(RUN_CONFIG="configs/nope.yaml"),
         "env.RUN_CONFIG: configs/nope.yaml is not in this checkout"),
        (lambda d: d["env"].update(RUN_SHARD=True), "env.RUN_SHARD: must be a string"),
        (lambda d: d.update(spot=True, bidPerGpu=None), "bidPerGpu: spot: true needs a bid"),
        (lambda d: d.update(ports=["6006/http", "22"]), "ports[1]: '22' is not PORT/http"),
        (lambda d: d.update(cloudType="cheap"), "cloudType: Input should be 'secure'"),
        (lambda d: d.update(command='bash -c "x"'), "command: contains a double quote"),
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
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    return api


def test_spot_mutation_is_the_sdk_mutation_plus_a_bid(sdk_env: FakeRunPod, tmp_path: Path) -> None:
    from orchestrator.pods import api as pods

    manifest = _load(tmp_path, lambda d: d.update(spot=True, bidPerGpu=1.25))
    spot = pods.resolve_request(manifest)
    on_demand = pods.PodRequest(kwargs=spot.kwargs, spot=False, bid_per_gpu=None)
    (spot_top,), (demand_top,) = parse(spot.graphql())[1], parse(on_demand.graphql())[1]
    assert (spot_top["name"], demand_top["name"]) == ("podRentInterruptable",
                                                      "podFindAndDeployOnDemand")
    spot_input = dict(spot_top["args"]["input"])
    assert spot_input.pop("bidPerGpu") == 1.25
    assert spot_input == demand_top["args"]["input"]
    assert pods.describe_request(spot).count("podRentInterruptable(") == 1


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

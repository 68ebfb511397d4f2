"""`orchestrate pod|volume ...` against a fake RunPod that enforces RunPod's own REST v2 contract.

The fake (tests/fake_runpod.py) validates every request against the vendored openapi.json from
runpod/docs (required fields, types, enums, 422 on unknown keys) and answers in the contract's
shapes, so a body podtrain gets wrong fails here as it would at api.runpod.io. Most commands run
in process through typer's runner (the real CLI, the real HTTP); a few run as the real
`python -m orchestrator.pods.cli`. Every run checks that the API key never appears in the output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fake_runpod import FakeRunPod
from orchestrator.pods import api as pods
from orchestrator.pods import rest
from orchestrator.pods.cli import app, volume_app
from orchestrator.pods.manifest import ManifestError, PodManifest, load_manifest, mask

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "infra" / "runpod-pod.yaml"
DOC = REPO / "docs" / "runpod.md"
KEY = "rp-test-key-5b1e9c0d7a"
VOLUME = "vol9test42"  # the fake account's volume, in data center EU-RO-1
REPO_URL = "https://example.org/podtrain.git"
# The ref the pod runs: a commit of this repository, so RUN_CONFIG is checked in its tree.
HEAD = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                      text=True, check=True).stdout.strip()
# One value of every credential shape the manifest refuses (never a real credential).
SECRETS = {
    "github classic": "ghp_" + "A1b2C3d4E5" * 4,
    "github oauth": "gho_" + "Z9y8X7w6V5" * 4,
    "github fine-grained": "github_pat_" + "11ABCDEFG0" * 5,
    "gitlab": "glpat-" + "abcDEF123_" * 2,
    "hugging face": "hf_" + "x" * 34,
    "runpod": "rpa_" + "Q" * 40,
    "openai-style": "sk-" + "proj_" + "k" * 40,
    "aws access key": "AKIA" + "IOSFODNN7EXAMPLE",
    "url password": "https://x-access-token:s3cr3tPassw0rd@github.com/me/podtrain.git",
}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    with FakeRunPod(KEY) as fake:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", fake.url)
        monkeypatch.setenv("RUNPOD_API_KEY", KEY)
        yield fake


def _manifest(tmp_path: Path, env: dict[str, Any] | None = None, **changes: Any) -> Path:
    """The shipped manifest with the volume and repository set (and any changes), as a file."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["volumeMounts"][0]["volumeName"] = VOLUME
    data["env"].update(RUN_REPO=REPO_URL, RUN_REF=HEAD)
    data.update(changes)
    data["env"].update(env or {})
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Out:
    """A finished command: exit code, stdout, stderr."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


def _run(*args: str, volume: bool = False) -> Out:
    """The real CLI in process (typer's runner), output checked for the API key and tracebacks."""
    result = CliRunner().invoke(volume_app if volume else app, list(args), catch_exceptions=False)
    out = Out(result.exit_code, result.stdout, result.stderr)
    assert KEY not in out.stdout + out.stderr and "Traceback" not in out.stderr
    return out


def _one_error_line(result: Out) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- create ------------------------------------------------------------------------------------


def test_create_sends_a_body_the_v2_contract_accepts(api: FakeRunPod, tmp_path: Path) -> None:
    before = int(time.time())
    result = _run("create", "-f", str(_manifest(tmp_path)))
    assert result.returncode == 0, result.stderr
    (create,) = api.find("createPod")
    body = create.body
    env = body.pop("env")
    assert body == {
        "name": "podtrain-runpod-1b",
        "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2204",
        "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 1, "minCudaVersion": "12.8"},
        "cloud": "SECURE", "disk": 50, "ports": ["6006/http", "22/tcp"],
        "mounts": {"network": [{"volumeId": VOLUME, "path": "/workspace"}]},
        "startSsh": True, "args": yaml.safe_load(SHIPPED.read_text())["command"],
        "dataCenterIds": ["EU-RO-1"],
    }
    # The contract with boot.sh and the reaper: an absolute deadline, and the podtrain mark.
    deadline = int(env["RUN_DEADLINE"])
    assert before + 72 * 3600 <= deadline <= int(time.time()) + 72 * 3600
    assert env["PODTRAIN_MANAGED"] == "1" and env["RUN_VOLUME_ID"] == VOLUME
    assert env["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}" and env["RUN_REF"] == HEAD
    pod_id = next(iter(api.pods))
    assert f"Created pod {pod_id} 'podtrain-runpod-1b': 1 x NVIDIA A100 80GB PCIe, secure " \
           f"cloud, on demand, about $1.64/h" in result.stdout
    assert f"RUN_DEADLINE={deadline}" in result.stdout and "RunPod stops" not in result.stdout
    # Before the create: GPU types from the catalog, the volume, the twin check.
    assert api.operations() == ["getGpuType"] * 3 + ["listNetworkVolumes", "listPods", "createPod"]


def test_an_explicit_cuda_list_is_sent_only_when_given(api: FakeRunPod, tmp_path: Path) -> None:
    path = _manifest(tmp_path, image="me/podtrain:v3", allowedCudaVersions=["12.8", "12.9"],
                     minCudaVersion="12.8")
    assert _run("create", "-f", str(path)).returncode == 0
    (create,) = api.find("createPod")
    assert create.body["gpu"] == {"id": "NVIDIA A100 80GB PCIe", "count": 1,
                                  "minCudaVersion": "12.8", "allowedCudaVersions": ["12.8", "12.9"]}


def test_the_fake_enforces_the_contract(api: FakeRunPod) -> None:
    """Unknown keys, a wrong type and a bad enum are 422 with RunPod's error shape, as documented;
    podtrain reports them as one line naming the call and the status."""
    good = {"name": "x", "image": "i", "gpu": {"id": "NVIDIA H100 80GB HBM3", "count": 1}}
    for bad, words in [({**good, "stopAfter": "2026-01-01T00:00:00Z"}, "stopAfter"),
                       ({**good, "gpu": {"id": "g", "gpuTypeId": "g"}}, "gpuTypeId"),
                       ({**good, "env": [{"key": "A", "value": "1"}]}, "is not of type 'object'"),
                       ({**good, "cloud": "ALL"}, "'ALL' is not one of"),
                       ({"image": "i"}, "'name' is a required property")]:
        with pytest.raises(rest.PodError, match=r"cannot create the pod on .*: RunPod answered "
                                                r"HTTP 422: Request validation failed\.") as err:
            rest.create_pod(bad)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(rest.PodError, match="HTTP 422.*'restart-now' is not one of"):
        rest.pod_action("nope", "restart-now")
    assert not api.pods


def test_unknown_manifest_key_is_one_line_and_nothing_is_sent(api: FakeRunPod,
                                                             tmp_path: Path) -> None:
    path = _manifest(tmp_path, gpuTypes=["NVIDIA H100 80GB HBM3"])
    for extra in ([], ["--dry-run"], ["--print-runpodctl"]):
        line = _one_error_line(_run("create", "-f", str(path), *extra))
        assert line == f"error: {path}: gpuTypes: unknown key (did you mean 'gpuType'?)"
    assert api.requests == []


def test_a_quoted_env_value_with_a_newline_arrives_intact(api: FakeRunPod, tmp_path: Path) -> None:
    note = 'say "hi" from C:\\temp\\new\nsecond line\twith a tab and a \\" pair'
    path = _manifest(tmp_path, env={"NOTE": note})  # written as a double-quoted YAML scalar
    assert '"say \\"hi\\"' in path.read_text() and load_manifest(path).env["NOTE"] == note
    result = _run("create", "-f", str(path))
    assert result.returncode == 0, result.stderr
    (create,) = api.find("createPod")
    assert create.body["env"]["NOTE"] == note
    assert next(iter(api.pods.values()))["env"]["NOTE"] == note


# Every shape, and every field, at least once (each field with a different shape).
FIELDS = ["env name", "name", "image", "command", "env value", "RUN_REPO", "gpuType", "ports",
          "volumeName"]


@pytest.mark.parametrize(("where", "shape"), list(zip(FIELDS, sorted(SECRETS))))
def test_a_secret_anywhere_is_refused_never_printed_never_sent(
    api: FakeRunPod, tmp_path: Path, where: str, shape: str
) -> None:
    secret = SECRETS[shape]
    changes: dict[str, Any] = {
        "name": {"name": f"pod-{secret}"},
        "image": {"image": f"ghcr.io/me/podtrain:{secret}"},
        "command": {"command": f"bash -c 'export T={secret}; exec bash boot.sh'"},
        "env value": {"env": {"MIRROR": f"x {secret} y"}},
        "env name": {"env": {secret: "1"}},
        "RUN_REPO": {"env": {"RUN_REPO": secret if "://" in secret else
                             f"https://x-access-token:{secret}@github.com/me/p.git"}},
        "gpuType": {"gpuType": ["NVIDIA A100 80GB PCIe", f"NVIDIA {secret}"]},
        "ports": {"ports": ["6006/http", f"{secret}/tcp"]},
        "volumeName": {"volumeMounts": [{"volumeName": secret, "mountPath": "/workspace"}]},
    }[where]
    path = _manifest(tmp_path, **{k: v for k, v in changes.items() if k != "env"},
                     env=changes.get("env"))
    # The secret itself, and its password/tail part, must appear nowhere.
    hidden = [secret.split(":")[2].split("@")[0]] if "://" in secret else [secret, secret[6:]]
    for extra in ([], ["--dry-run"], ["--print-runpodctl"]):
        result = _run("create", "-f", str(path), *extra)
        line = _one_error_line(result)
        assert "looks like a literal access token or a URL with a password" in line, line
        assert "RUNPOD_SECRET_" in line
        for text in hidden:
            assert text not in result.stdout + result.stderr
    assert api.requests == []


def test_a_token_as_an_env_name_is_masked_in_the_error(tmp_path: Path) -> None:
    """Issue 25 item 3: the line named the key, token and all, while promising never to print it."""
    token = SECRETS["hugging face"]
    path = _manifest(tmp_path, env={token: "1"})
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == (
        f"{path}: env.hf_***: looks like a literal access token or a URL with a password; put it "
        "in a RunPod secret and write '{{ RUNPOD_SECRET_<name> }}' in env (it is never sent or "
        "printed)")


def test_mask_hides_every_shape_and_keeps_the_rest() -> None:
    for secret in SECRETS.values():
        assert secret not in mask(f"a {secret} b")
    assert mask("https://user:pw1@host/x and ghp_" + "a" * 36) == "https://user:***@host/x and ghp_***"
    assert mask("https://github.com/me/p.git HF_HOME=/workspace/hf_cache task-list") == \
        "https://github.com/me/p.git HF_HOME=/workspace/hf_cache task-list"


def test_gpu_types_are_tried_in_order_when_runpod_cannot_place_one(api: FakeRunPod,
                                                                   tmp_path: Path) -> None:
    api.full_gpu_types = {"NVIDIA A100 80GB PCIe"}
    path = _manifest(tmp_path, gpuType=["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"])
    result = _run("create", "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert [r.body["gpu"]["id"] for r in api.find("createPod")] == [
        "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"]
    assert "1 x NVIDIA H100 80GB HBM3" in result.stdout and "about $2.99/h" in result.stdout

    api.full_gpu_types.add("NVIDIA H100 80GB HBM3")
    line = _one_error_line(_run("create", "-f", str(path), "--force"))
    assert "cannot create the pod on NVIDIA H100 80GB HBM3: RunPod answered HTTP 400: There " \
           "are no longer any instances available" in line
    assert line.endswith("(also not placed: NVIDIA A100 80GB PCIe)")


def test_price_caps_refuse_before_create_showing_the_price(api: FakeRunPod,
                                                           tmp_path: Path) -> None:
    line = _one_error_line(_run("create", "-f", str(_manifest(tmp_path, maxHourlyPrice=1.5))))
    assert line == (
        "error: refused before create: every GPU type costs more than the caps allow (NVIDIA "
        "A100 80GB PCIe: $1.64/h > maxHourlyPrice $1.50/h; NVIDIA A100-SXM4-80GB: $1.89/h > "
        "maxHourlyPrice $1.50/h; NVIDIA H100 80GB HBM3: $2.99/h > maxHourlyPrice $1.50/h)")
    total = _manifest(tmp_path, maxTotalPrice=100, maxRuntimeHours=72, gpuCount=2)
    assert "NVIDIA A100 80GB PCIe: $3.28/h x 72 h = $236.16 > maxTotalPrice $100.00" in \
        _one_error_line(_run("create", "-f", str(total)))
    assert not api.find("createPod")

    # A cap that only the first type breaks: the next type that fits is created.
    fits = _manifest(tmp_path, maxHourlyPrice=1.9, gpuType=["NVIDIA H100 80GB HBM3",
                                                            "NVIDIA A100-SXM4-80GB"])
    result = _run("create", "-f", str(fits))
    assert result.returncode == 0, result.stderr
    assert [r.body["gpu"]["id"] for r in api.find("createPod")] == ["NVIDIA A100-SXM4-80GB"]
    assert "about $1.89/h" in result.stdout


def test_a_create_that_times_out_says_a_pod_may_exist(api: FakeRunPod, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 17: the answer came too late, the pod exists; say so and name it."""
    monkeypatch.setattr(rest, "TIMEOUT_S", (5, 0.3))
    api.create_delay_s = 1.0
    line = _one_error_line(_run("create", "-f", str(_manifest(tmp_path))))
    pod_id = next(iter(api.pods))
    assert line.startswith("error: cannot create the pod on NVIDIA A100 80GB PCIe: no answer "
                           "from the RunPod API"), line
    assert f"a pod named 'podtrain-runpod-1b' exists now: {pod_id} (RUNNING)" in line
    assert len(api.find("createPod")) == 1  # never resent blindly
    # When the pod does not show (yet): how to look before creating again.
    api.pods.clear()
    api.requests.clear()
    message = pods._maybe_created(rest.PodError("cannot create the pod on X: no answer"),
                                  "podtrain-runpod-1b")
    assert message.endswith("the pod may still have been created: `orchestrate pod list` (look "
                            "for 'podtrain-runpod-1b') before creating again")


def test_transient_failures_are_retried_and_errors_are_one_line(api: FakeRunPod,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, "BACKOFF_S", 0.01)
    api.fail_next = [429, 503, 502]
    assert rest.list_pods() == []
    assert api.operations() == ["", "", "", "listPods"]
    api.fail_next = [500] * rest.ATTEMPTS
    with pytest.raises(rest.PodError, match=r"^cannot list pods: RunPod answered HTTP 500: the "
                                            r"fake answers as told: a transient failure$"):
        rest.list_pods()
    api.fail_next = [503]  # a create is not resent after a 5xx: the pod may exist
    with pytest.raises(rest.PodError) as err:
        rest.create_pod({"name": "x", "image": "i", "gpu": {"id": "g", "count": 1}})
    assert err.value.uncertain and err.value.status == 503
    monkeypatch.setenv("RUNPOD_API_KEY", "not-the-key")
    with pytest.raises(rest.PodError, match=r"HTTP 401: invalid bearer token \(check "
                                            r"RUNPOD_API_KEY"):
        rest.list_pods()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", "http://127.0.0.1:9")  # the discard port: closed
    with pytest.raises(rest.PodError, match=r"cannot list pods: no answer from the RunPod API at "
                                            r"http://127.0.0.1:9 \(ConnectionError\)") as err:
        rest.list_pods()
    assert not err.value.uncertain
    monkeypatch.delenv("RUNPOD_API_KEY")
    with pytest.raises(rest.PodError, match="RUNPOD_API_KEY is not set"):
        rest.list_pods()


def test_dry_run_prints_the_request_and_creates_nothing(api: FakeRunPod, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _manifest(tmp_path)
    result = _run("create", "-f", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"# POST {api.url}/v2/pods with 'Authorization: Bearer $RUNPOD_API_KEY'" in result.stdout
    assert '"dataCenterIds": [\n    "EU-RO-1"\n  ]' in result.stdout
    assert "# price: about $1.64/h for this pod" in result.stdout
    assert not api.find("createPod")
    monkeypatch.delenv("RUNPOD_API_KEY")
    api.requests.clear()
    offline = _run("create", "-f", str(path), "--dry-run")
    assert "# dataCenterIds: filled in at create time" in offline.stdout and api.requests == []


def test_a_second_pod_for_a_running_experiment_is_refused(api: FakeRunPod,
                                                          tmp_path: Path) -> None:
    twin = api.add_pod(name="podtrain-runpod-1b", env={"RUN_EXPERIMENT": "runpod-1b",
                                                       "RUN_VOLUME_ID": VOLUME})
    path = _manifest(tmp_path)
    line = _one_error_line(_run("create", "-f", str(path)))
    assert f"pod {twin['id']} (podtrain-runpod-1b, RUNNING) already runs experiment " \
           f"'runpod-1b' on volume {VOLUME}" in line and "--force" in line
    assert not api.find("createPod")
    assert _run("create", "-f", str(path), "--experiment", "runpod-2b").returncode == 0
    api.pods[twin["id"]]["status"] = "EXITED"
    assert _run("create", "-f", str(path)).returncode == 0
    assert len(api.find("createPod")) == 2


def test_an_experiment_named_for_a_size_takes_that_config(api: FakeRunPod, tmp_path: Path) -> None:
    """`--experiment runpod-2b` without `--config` trains the 2B config in the pod, not the manifest's 1B (issue 24)."""
    path = _manifest(tmp_path)
    assert _run("create", "-f", str(path), "--experiment", "runpod-2b").returncode == 0
    assert _run("create", "-f", str(path), "--experiment", "runpod-4b", "--config", "configs/runpod_1b.yaml",
                "--force").returncode == 0
    assert _run("create", "-f", str(path), "--experiment", "mine", "--force").returncode == 0
    envs = [r.body["env"] for r in api.find("createPod")]
    assert [(e["RUN_EXPERIMENT"], e["RUN_CONFIG"]) for e in envs] == [
        ("runpod-2b", "configs/runpod_2b.yaml"), ("runpod-4b", "configs/runpod_1b.yaml"), ("mine", "configs/runpod_1b.yaml")]


# -- spot: the legacy GraphQL path -------------------------------------------------------------


def test_spot_checks_the_minimum_bid_and_rents_through_graphql(api: FakeRunPod,
                                                               tmp_path: Path) -> None:
    low = _manifest(tmp_path, spot=True, bidPerGpu=0.5, gpuType="NVIDIA A100 80GB PCIe")
    line = _one_error_line(_run("create", "-f", str(low)))
    assert line == ("error: bidPerGpu: $0.500/h is under RunPod's minimum spot bid for NVIDIA "
                    "A100 80GB PCIe ($0.600/h now): raise it")
    assert not any("podRentInterruptable" in r.body["query"] for r in api.find("graphql"))

    ok = _manifest(tmp_path, spot=True, bidPerGpu=0.7, gpuType="NVIDIA A100 80GB PCIe",
                   env={"NOTE": 'a "quoted"\nvalue'})
    result = _run("create", "-f", str(ok))
    assert result.returncode == 0, result.stderr
    assert "spot (legacy GraphQL), about $0.70/h" in result.stdout
    (rent,) = [r for r in api.find("graphql") if "podRentInterruptable" in r.body["query"]]
    assert rent.input["bidPerGpu"] == 0.7 and rent.input["networkVolumeId"] == VOLUME
    env = {e["key"]: e["value"] for e in rent.input["env"]}
    assert env["NOTE"] == 'a "quoted"\nvalue' and env["PODTRAIN_MANAGED"] == "1"
    assert "legacy GraphQL" in _run("create", "--help").stdout


# -- reading and changing pods -------------------------------------------------------------------


def test_list_get_start_stop_delete(api: FakeRunPod) -> None:
    token = SECRETS["github classic"]  # a pod made elsewhere may carry one: never shown
    pod = api.add_pod(name="podtrain-x", uptime=5400, env={
        "RUN_EXPERIMENT": "x", "HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}", "WANDB_API_KEY": "abc",
        "MIRROR": f"https://me:{token}@example.org"})
    listed = _run("list")
    assert pod["id"] in listed.stdout and "RUNNING" in listed.stdout and "1h30m" in listed.stdout
    shown = _run("get", pod["id"])
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"ssh          ssh {pod['id']}-64411eb2@ssh.runpod.io -i ~/.ssh/id_ed25519" in out
    assert "ssh          ssh root@203.0.113.7 -p 40022 -i ~/.ssh/id_ed25519" in out
    assert "env          WANDB_API_KEY=<hidden>" in out and "abc" not in out
    assert "env          HF_TOKEN={{ RUNPOD_SECRET_hf_token }}" in out
    assert f"tensorboard  https://{pod['id']}-6006.proxy.runpod.net" in out
    assert "env          MIRROR=https://me:***@example.org" in out
    as_json = _run("get", pod["id"], "--json").stdout + _run("list", "--json").stdout
    assert '"WANDB_API_KEY": "<hidden>"' in as_json and token not in as_json
    assert _run("stop", pod["id"]).stdout == f"pod {pod['id']}: EXITED\n"
    assert _run("start", pod["id"]).stdout == f"pod {pod['id']}: RUNNING\n"
    assert [r.body for r in api.find("podAction")] == [{"action": "stop"}, {"action": "start"}]
    assert _run("delete", pod["id"]).returncode == 0 and not api.pods
    assert _one_error_line(_run("get", pod["id"])) == \
        f"error: pod {pod['id']}: no such pod in this RunPod account (orchestrate pod list)"
    assert "letters, digits" in _one_error_line(_run("get", 'abc"def'))


def test_logs_read_the_v2_event_stream(api: FakeRunPod) -> None:
    pod = api.add_pod(name="podtrain-logs")
    api.logs[pod["id"]] = [{"ts": f"2026-06-01T12:00:{i:02d}Z", "source": "container",
                            "line": f"boot: line {i}"} for i in range(10)]
    assert _run("logs", pod["id"], "--tail", "3").stdout == \
        "boot: line 7\nboot: line 8\nboot: line 9\n"
    assert _run("logs", "podtrain-logs", "--since", "2026-06-01T12:00:08Z").stdout == \
        "boot: line 8\nboot: line 9\n"
    (first, since) = api.find("getPodLogs")
    assert first.params == {"tail": "3"} and since.params == {"tail": "100",
                                                            "since": "2026-06-01T12:00:08Z"}
    assert "--tail 9000: RunPod serves 0 to 5000 lines" in _one_error_line(
        _run("logs", pod["id"], "--tail", "9000"))
    assert "--since 'yesterday'" in _one_error_line(_run("logs", pod["id"], "--since", "yesterday"))


def test_logs_follow_resumes_after_the_last_event(api: FakeRunPod, tmp_path: Path) -> None:
    """`-f` as a real process: new lines appear once, resumed by Last-Event-ID."""
    pod = api.add_pod(name="podtrain-follow")
    api.logs[pod["id"]] = [{"ts": "2026-06-01T12:00:00Z", "source": "container", "line": "one"}]
    out = tmp_path / "follow.out"
    env = {**os.environ, "RUNPOD_API_BASE_URL": api.url, "RUNPOD_API_KEY": KEY}
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.pods.cli", "logs",
                                 pod["id"], "-f"], cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while out.read_text() != "one\n":
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        api.logs[pod["id"]].append({"ts": "2026-06-01T12:00:01Z", "source": "container",
                                    "line": "two"})
        while out.read_text() != "one\ntwo\n":
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    resumed = [r.headers.get("Last-Event-ID") for r in api.find("getPodLogs")]
    assert resumed[0] is None and "2026-06-01T12:00:00Z/000000000001" in resumed


def test_reap_stops_only_podtrain_pods_past_their_deadline(api: FakeRunPod) -> None:
    now = int(time.time())
    due = api.add_pod(name="due", env={"PODTRAIN_MANAGED": "1", "RUN_DEADLINE": str(now - 60)})
    later = api.add_pod(name="later", env={"PODTRAIN_MANAGED": "1",
                                           "RUN_DEADLINE": str(now + 3600)})
    foreign = api.add_pod(name="not-ours", env={"RUN_DEADLINE": str(now - 60)})
    stopped = api.add_pod(name="stopped", env={"PODTRAIN_MANAGED": "1",
                                               "RUN_DEADLINE": str(now - 60)})
    api.pods[stopped["id"]].update(status="EXITED", runtime=None, actions=["start", "terminate"])

    dry = _run("reap", "--dry-run")
    assert dry.stdout.startswith(f"would stop pod {due['id']} 'due' (RUNNING, past its deadline ")
    assert dry.stdout.count("\n") == 1 and not api.find("podAction")
    result = _run("reap")
    assert result.returncode == 0, result.stderr
    assert [(r.path_params["id"], r.body) for r in api.find("podAction")] == [
        (due["id"], {"action": "stop"})]
    assert api.pods[later["id"]]["status"] == api.pods[foreign["id"]]["status"] == "RUNNING"
    assert _run("reap").stdout == "nothing to reap\n"

    deleted = _run("reap", "--terminate")  # past-deadline pods, stopped ones too, are deleted
    assert sorted(r.path_params["id"] for r in api.find("deletePod")) == sorted(
        [due["id"], stopped["id"]])
    assert "deleted pod" in deleted.stdout and set(api.pods) == {later["id"], foreign["id"]}


def test_reap_idle_pods_only_when_asked(api: FakeRunPod) -> None:
    far = str(int(time.time()) + 3600)
    busy = api.add_pod(name="busy", env={"PODTRAIN_MANAGED": "1", "RUN_DEADLINE": far})
    idle = api.add_pod(name="idle", env={"PODTRAIN_MANAGED": "1", "RUN_DEADLINE": far})
    api.pods[idle["id"]]["runtime"]["gpus"] = [{"util": 0, "memoryUtil": 0}]
    hung = api.add_pod(name="hung", env={"PODTRAIN_MANAGED": "1", "RUN_DEADLINE": far})
    api.pods[hung["id"]]["runtime"] = None
    for pod_id in (busy["id"], idle["id"], hung["id"]):
        api.pods[pod_id]["startedAt"] = "2026-01-01T00:00:00Z"
    assert _run("reap").stdout == "nothing to reap\n"
    out = _run("reap", "--idle-minutes", "30").stdout
    assert "its GPUs show 0% use and no memory" in out and "container is not up" in out
    assert sorted(r.path_params["id"] for r in api.find("podAction")) == sorted(
        [idle["id"], hung["id"]])
    assert _one_error_line(_run("reap", "--idle-minutes", "-5")) == \
        "error: --idle-minutes -5: give a positive number of minutes"


def test_status_reads_metrics_over_ssh_and_logs_ssh_is_the_fallback(
    api: FakeRunPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"  # a stand-in: records its arguments, serves the files from FAKE_SSH_DIR
    ssh.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_SSH_LOG"\n'
                   'for last; do :; done\ncase "$last" in\n'
                   '  *metrics.jsonl*) cat "$FAKE_SSH_DIR/metrics.jsonl";;\n'
                   '  *boot.log*) cat "$FAKE_SSH_DIR/boot.log";;\nesac\n')
    ssh.chmod(0o755)
    (tmp_path / "metrics.jsonl").write_text('{"step": 41, "loss": 3.5}\n{"step": 42, "loss": 3.25}\n')
    (tmp_path / "boot.log").write_text("boot: stage train: start\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh.args"))
    monkeypatch.setenv("FAKE_SSH_DIR", str(tmp_path))
    pod = api.add_pod(name="podtrain-exp1", uptime=9000, cost=1.64,
                      env={"RUN_EXPERIMENT": "exp1", "RUN_DEADLINE": "1796667954"})
    out = _run("status", "podtrain-exp1").stdout
    assert "RUNNING" in out and "2h30m" in out and "$4.10 so far at $1.64/h" in out
    assert "step 42, loss 3.2500" in out and "deadline     2026-12-07T18:25:54Z" in out
    args = (tmp_path / "ssh.args").read_text().splitlines()
    assert args[:2] == ["-p", "40022"] and "root@203.0.113.7" in args
    logs = subprocess.run([sys.executable, "-m", "orchestrator.pods.cli", "logs", pod["id"],
                           "--ssh", "-n", "20"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RUNPOD_API_BASE_URL": api.url,
                               "RUNPOD_API_KEY": KEY}, timeout=60)
    assert logs.stdout == "boot: stage train: start\n", logs.stderr
    assert (tmp_path / "ssh.args").read_text().splitlines()[-1] == \
        "tail -n 20 /workspace/runs/exp1/boot.log"


# -- volumes -----------------------------------------------------------------------------------


def test_volume_create_checks_size_stock_and_cloud(api: FakeRunPod, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, gpuType=["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"])
    args = ["create", "--name", 'data "2"', "--data-center", "EU-RO-1", "-f", str(manifest)]
    assert _one_error_line(_run(*args, "--size", "-5", volume=True)) == \
        "error: --size -5: a network volume is 10 to 4096 GB"
    line = _one_error_line(_run("create", "--name", "v", "--size", "50", "--data-center",
                                "US-KS-2", "-f", str(manifest), volume=True))
    assert line == (f"error: --data-center US-KS-2: none of {manifest}'s GPU types (NVIDIA A100 "
                    "80GB PCIe, NVIDIA A100-SXM4-80GB) is in stock there (in stock: NVIDIA H100 "
                    "80GB HBM3 (LOW)); a pod must run in its volume's data center")
    (tmp_path / "c").mkdir()
    community = _manifest(tmp_path / "c", cloudType="community")
    assert "cloudType: community cloud cannot mount a network volume" in _one_error_line(
        _run("create", "--name", "v", "--size", "50", "--data-center", "EU-RO-1", "-f",
             str(community), volume=True))
    assert not api.find("createNetworkVolume")

    created = _run(*args, "--size", "500", volume=True)
    assert created.returncode == 0, created.stderr
    (request,) = api.find("createNetworkVolume")
    assert request.body == {"name": 'data "2"', "size": 500, "dataCenter": "EU-RO-1"}
    volume_id = api.volumes[-1]["id"]
    assert f"volumeMounts[0].volumeName: {volume_id}" in created.stdout
    assert [v["id"] for v in pods.list_volumes()] == [VOLUME, volume_id]
    assert volume_id in _run("list", volume=True).stdout


def test_the_real_entry_point_reports_one_line(api: FakeRunPod, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "orchestrator.pods.cli", "volume", "create",
                             "--name", "v", "--size", "-5", "--data-center", "EU-RO-1"],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "RUNPOD_API_BASE_URL": api.url,
                                 "RUNPOD_API_KEY": KEY})
    assert (result.returncode, result.stderr) == (
        1, "error: --size -5: a network volume is 10 to 4096 GB\n")


# -- the runpodctl line and the docs -------------------------------------------------------------


def test_print_runpodctl_is_the_line_in_the_docs(api: FakeRunPod) -> None:
    result = _run("create", "-f", "infra/runpod-pod.yaml", "--print-runpodctl")
    assert result.returncode == 0, result.stderr
    line, *lost = result.stdout.splitlines()
    assert line.startswith("runpodctl pod create --name podtrain-runpod-1b --image ")
    assert "--min-cuda-version 12.8" in line and "--network-volume-id YOUR_VOLUME_ID" in line
    assert all(item.startswith("# cannot express: ") for item in lost)
    assert any("gpuType" in item for item in lost) and any("RUN_DEADLINE" in item for item in lost)
    doc = DOC.read_text()
    block = doc.split("<!-- runpodctl-line -->\n```bash\n", 1)[1].split("\n```", 1)[0]
    assert block == result.stdout.rstrip("\n"), (
        "docs/runpod.md's runpodctl line is stale: regenerate it with "
        "`orchestrate pod create -f infra/runpod-pod.yaml --print-runpodctl`")
    assert api.requests == []  # the placeholder volume is not looked up


def test_print_runpodctl_pins_a_real_volumes_data_center(api: FakeRunPod, tmp_path: Path) -> None:
    result = _run("create", "-f", str(_manifest(tmp_path)), "--print-runpodctl")
    assert result.returncode == 0, result.stderr
    assert " --network-volume-id vol9test42 " in result.stdout
    assert " --data-center-ids EU-RO-1 " in result.stdout and "dataCenterIds" not in result.stdout
    assert api.operations() == ["listNetworkVolumes"] and not api.pods


def test_docs_claim_no_server_side_runtime_cap() -> None:
    """The old docs promised "RunPod stops it at ..." (GraphQL's stopAfter, which RunPod ignores)."""
    false_claims = ("RunPod stops it", "RunPod stops the pod", "server-side `stopAfter`",
                    "RunPod's `terminateAfter`", "terminateAfterHours` do it", "(stopAfter)")
    for path in (DOC, REPO / "README.md", SHIPPED, REPO / "orchestrator" / "pods" / "manifest.py"):
        text = " ".join(path.read_text().split())
        assert not [c for c in false_claims if c in text], path
    assert "RunPod enforces no runtime cap" in " ".join(DOC.read_text().split())
    assert "Python 3.12" in DOC.read_text() and "Python 3.11" not in DOC.read_text()


# -- manifest validation, in process -------------------------------------------------------------


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
        (lambda d: d["volumeMounts"][0].update(mountPath="/runpod-volume"),
         "volumeMounts[0].mountPath: must be /workspace"),
        (lambda d: d["env"].update(HF_TOKEN="plain"),
         "env.HF_TOKEN: a secret must be a RunPod secret reference"),
        (lambda d: d["env"].update({'BAD"NAME': "1"}), "env['BAD\"NAME']: is not a valid variable"),
        (lambda d: d["env"].update(RUN_DEADLINE="1"), "env.RUN_DEADLINE: is set by `orchestrate "
                                                       "pod create` itself"),
        (lambda d: d["env"].update(PODTRAIN_MANAGED="0"), "env.PODTRAIN_MANAGED: is set by"),
        (lambda d: d["env"].update(RUN_SHARD="2"), "env.RUN_SHARD: must be 'auto', '0' or '1'"),
        (lambda d: d["env"].update(RUN_CONFIG="configs/nope.yaml"),
         f"env.RUN_CONFIG: configs/nope.yaml is not in RUN_REF {HEAD}; known there: "),
        (lambda d: d["env"].update(RUN_REPO="https://github.com/YOUR_ORG/podtrain.git"),
         "env.RUN_REPO: set your podtrain repository"),
        (lambda d: d.update(image="ghcr.io/me/podtrain:latest"),
         "minCudaVersion: the image tag names no CUDA version"),
        (lambda d: d.update(minCudaVersion="12"), "minCudaVersion: String should match pattern"),
        (lambda d: d.update(allowedCudaVersions=["12.8", "twelve"]),
         "allowedCudaVersions[1]: 'twelve' is not a CUDA version"),
        (lambda d: d.update(cloudType="all"), "cloudType: Input should be 'secure' or 'community'"),
        (lambda d: d.update(cloudType="community"),
         "cloudType: community cloud cannot mount a network volume"),
        (lambda d: d.update(minVcpuCount=8), "minVcpuCount: REST v2 has no CPU floor"),
        (lambda d: d.update(minMemoryInGb=64), "minMemoryInGb: REST v2 has no RAM floor"),
        (lambda d: d.update(terminateAfterHours=96), "terminateAfterHours: RunPod enforces no"),
        (lambda d: d.update(maxHourlyPrice=0), "maxHourlyPrice: Input should be greater than 0"),
        (lambda d: d.update(maxRuntimeHours=0), "maxRuntimeHours: Input should be greater than 0"),
        (lambda d: d.update(spot=True, bidPerGpu=None), "bidPerGpu: spot: true needs a bid"),
        (lambda d: d.update(ports=["6006/http", "22"]), "ports[1]: '22' is not PORT/http"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_key(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        _load(tmp_path, mutate)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'm.yaml'}: {message}"), text
    assert "\n" not in text


def test_manifest_floor_and_env(tmp_path: Path) -> None:
    manifest = _load(tmp_path, lambda d: d["env"].update(RUN_SHARD=1, SHARD_LINES=1000))
    assert (manifest.env["RUN_SHARD"], manifest.env["SHARD_LINES"]) == ("1", "1000")
    assert manifest.cuda_floor == "12.8" and manifest.allowed_cuda_versions is None
    listed = _load(tmp_path, lambda d: d.update(image="me/podtrain:v3",
                                                allowedCudaVersions=["12.8", "13.0"]))
    assert listed.cuda_floor is None and listed.allowed_cuda_versions == ["12.8", "13.0"]
    env = manifest.pod_env(deadline=1_800_000_000)
    assert env["RUN_DEADLINE"] == "1800000000" and env["PODTRAIN_MANAGED"] == "1"
    with pytest.raises(ManifestError, match="command line: env.SHARD_LINES"):
        manifest.with_overrides(shard_lines=0)

"""`orchestrate pod ...` (create from infra/runpod-pod.yaml, list, get, status, logs, start, stop,
delete, reap) and `orchestrate volume ...` (network volumes: list, create), over RunPod's REST v2.

runpodctl has no manifest flag (`runpodctl create pod -f` does not exist): `pod create
--print-runpodctl` prints the closest `runpodctl pod create --...` line. Mounted by the main CLI
as `orchestrate pod` / `orchestrate volume`; runnable alone as `python -m orchestrator.pods.cli`
(pod) and `python -m orchestrator.pods.cli volume ...`. Every failure is one line on stderr and
exit 1; no secret is ever printed (token shapes are masked in every line).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.pods import api as pods
from orchestrator.pods import remote, rest
from orchestrator.pods.manifest import ManifestError, load_manifest, mask
from orchestrator.pods.reaper import reap_pods
from orchestrator.pods.runpodctl import runpodctl_line

F = TypeVar("F", bound=Callable[..., Any])
PodId = Annotated[str, typer.Argument(metavar="ID", help="A pod id, as `list` shows it.")]
PodRef = Annotated[str, typer.Argument(metavar="NAME|ID", help="A pod's id or name.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print RunPod's record(s) as JSON.")]


def _typer(name: str, what: str) -> typer.Typer:
    return typer.Typer(name=name, help=f"{what} (reads RUNPOD_API_KEY; never prints it).",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = _typer("pod", "RunPod pods from infra/runpod-pod.yaml, over RunPod's REST API v2 (spot "
                    "pods: the legacy GraphQL API)")
volume_app = _typer("volume", "RunPod network volumes")


def _one_line_errors(command: F) -> F:
    """User errors (bad manifest, RunPod refusals) end as one stderr line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ManifestError, pods.PodError, OSError) as exc:
            typer.echo(mask(f"error: {exc}"), err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _echo(text: str) -> None:
    typer.echo(mask(text))


def _follow_lines(pod: dict[str, Any], request: pods.PodRequest) -> list[str]:
    pod_id = pod["id"]
    experiment = request.body["env"].get("RUN_EXPERIMENT", "runpod-1b")
    lines = [
        "Follow it:",
        f"  logs         orchestrate pod logs {pod_id} -f",
        f"  status       orchestrate pod status {pod_id}",
        f"  ssh          orchestrate pod get {pod_id}    (the proxy and direct commands)",
    ]
    if "6006/http" in request.body["ports"]:
        lines.append(f"  tensorboard  {pods.tensorboard_url(pod_id)}")
    lines += [
        f"  boot log     /workspace/runs/{experiment}/boot.log (on the volume)",
        f"  stop         orchestrate pod stop {pod_id}    (GPU billing stops, volume kept)",
        f"  delete       orchestrate pod delete {pod_id}",
        "  reap         orchestrate pod reap    (stops podtrain pods past their deadline)",
    ]
    return lines


@app.command(epilog="Spot pods (spot: true) go through RunPod's legacy GraphQL API, which RunPod "
                    "retires in early 2027; everything else is REST v2.")
@_one_line_errors
def create(
    file: Annotated[Path, typer.Option("--file", "-f", help="The pod manifest.")],
    dry_run: Annotated[bool, typer.Option(help="Print the exact request; create nothing.")] = False,
    print_runpodctl: Annotated[bool, typer.Option(
        "--print-runpodctl", help="Print the equivalent `runpodctl pod create` line and what it "
                                  "cannot express; create nothing.")] = False,
    config: Annotated[str | None, typer.Option(help="Override env RUN_CONFIG.")] = None,
    experiment: Annotated[str | None, typer.Option(help="Override env RUN_EXPERIMENT.")] = None,
    shard: Annotated[bool | None, typer.Option("--shard/--no-shard", help="RUN_SHARD 1/0.")] = None,
    shard_lines: Annotated[int | None, typer.Option(min=1, help="Override SHARD_LINES.")] = None,
    force: Annotated[bool, typer.Option(
        help="Create even if a pod already runs this experiment on this volume.")] = False,
) -> None:
    """Create a pod from a manifest (validated first; nothing is sent when it is invalid).

    The pod gets RUN_DEADLINE (now + maxRuntimeHours, Unix seconds) and PODTRAIN_MANAGED=1 in its
    env: boot.sh stops it at the deadline, `orchestrate pod reap` from outside. RunPod itself
    enforces no runtime cap. maxHourlyPrice/maxTotalPrice refuse it before create.
    """
    manifest = load_manifest(file, placeholders_ok=print_runpodctl).with_overrides(
        config=config, experiment=experiment, shard=shard, shard_lines=shard_lines,
        placeholders_ok=print_runpodctl,
    )
    if print_runpodctl:
        line, lost = runpodctl_line(manifest, pods.volume_data_center(manifest))
        _echo(line)
        _echo("\n".join(f"# cannot express: {item}" for item in lost))
        return
    if dry_run:
        can_resolve = pods.has_api_key()
        request = pods.resolve_request(manifest) if can_resolve else pods.build_request(manifest)
        _echo(pods.describe_request(request))
        _echo("# dry run: nothing was created")
        return
    pod, request = pods.create_pod(manifest, force=force)
    kind = "spot (legacy GraphQL)" if request.spot else "on demand"
    price = request.hourly_price()
    cost = f", about ${price:.2f}/h" if price is not None else ""
    deadline = int(request.body["env"]["RUN_DEADLINE"])
    when = datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    _echo(f"Created pod {pod['id']} '{request.body['name']}': {request.body['gpu']['count']} x "
          f"{request.gpu_type}, {manifest.cloud_type} cloud, {kind}{cost}; deadline {when} "
          f"(RUN_DEADLINE={deadline}: boot.sh stops the pod then; `orchestrate pod reap` does "
          "from outside)")
    _echo("\n".join(_follow_lines(pod, request)))


def _gpu(pod: dict[str, Any]) -> str:
    gpu = pod.get("gpu") or {}
    return f"{gpu.get('count') or 0} x {gpu.get('id') or '?'}"


def _uptime(pod: dict[str, Any]) -> int:
    return int((pod.get("runtime") or {}).get("uptime") or 0)


def _duration(seconds: int) -> str:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command("list")
@_one_line_errors
def list_(as_json: JsonFlag = False) -> None:
    """List your pods."""
    records = pods.list_pods()
    if as_json:
        _echo(json.dumps([pods.public(p) for p in records], indent=2))
        return
    if not records:
        _echo("no pods")
        return
    table = Table("id", "name", "status", "gpu", "$/h", "uptime", "image")
    for pod in records:
        table.add_row(pod.get("id", "?"), pod.get("name", ""), pod.get("status", ""), _gpu(pod),
                      f"{pod.get('cost') or 0:.2f}", _duration(_uptime(pod)), pod.get("image", ""))
    Console(width=160).print(table)


@app.command()
@_one_line_errors
def get(pod_id: PodId, as_json: JsonFlag = False) -> None:
    """Show one pod: status, cost, SSH (proxy and direct), TensorBoard, env (secrets hidden)."""
    pod = pods.get_pod(pod_id)
    if as_json:
        _echo(json.dumps(pods.public(pod), indent=2))
        return
    ports = pod.get("ports") or []
    network = ((pod.get("mounts") or {}).get("network") or [{}])[0]
    rows = [
        ("id", pod.get("id")),
        ("name", pod.get("name")),
        ("status", pod.get("status")),
        ("gpu", _gpu(pod)),
        ("cost", f"${pod.get('cost') or 0:.2f}/h"),
        ("uptime", _duration(_uptime(pod))),
        ("image", pod.get("image")),
        ("command", pod.get("args") or "(image default)"),
        ("volume", f"{network.get('volumeId', '-')} at {network.get('path', '-')}"),
        ("ports", ",".join(ports)),
        ("logs", f"orchestrate pod logs {pod_id} -f"),
    ]
    rows += [("ssh", command) for command in pods.ssh_commands(pod)]
    if not pod.get("runtime"):
        rows.append(("runtime", "not running (starting, pulling the image, or stopped)"))
    if "6006/http" in ports:
        rows.append(("tensorboard", pods.tensorboard_url(pod_id)))
    rows += [("env", line) for line in pods.masked_env(pod.get("env"))]
    for key, value in rows:
        _echo(f"{key:<12} {value if value is not None else ''}")


@app.command()
@_one_line_errors
def start(pod_id: PodId) -> None:
    """Start a stopped pod again (it boots and resumes from the volume)."""
    answer = pods.start_pod(pod_id)
    _echo(f"pod {pod_id}: {answer.get('status', 'start requested')}")


@app.command()
@_one_line_errors
def stop(pod_id: PodId) -> None:
    """Stop a pod: its GPU is released (no GPU billing); /workspace on the volume stays."""
    answer = pods.stop_pod(pod_id)
    _echo(f"pod {pod_id}: {answer.get('status', 'stop requested')}")


@app.command()
@_one_line_errors
def delete(pod_id: PodId) -> None:
    """Delete (terminate) a pod for good; the network volume is not touched."""
    pods.terminate_pod(pod_id)
    _echo(f"pod {pod_id}: deleted")


@app.command()
@_one_line_errors
def reap(
    terminate: Annotated[bool, typer.Option(
        "--terminate", help="Delete the pods instead of stopping them.")] = False,
    idle_minutes: Annotated[float | None, typer.Option(
        help="Also reap running podtrain pods whose GPUs all show 0% use and no memory, or whose "
             "container is not up, this long after they started (see docs/runpod.md).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would be reaped; touch nothing.")] = False,
) -> None:
    """Stop (or delete) this account's podtrain pods past their RUN_DEADLINE (or idle).

    Podtrain pods are those with PODTRAIN_MANAGED=1 in their env (`pod create` sets it); no other
    pod is touched.
    """
    if idle_minutes is not None and not idle_minutes > 0:
        raise pods.PodError(f"--idle-minutes {idle_minutes:g}: give a positive number of minutes")
    lines = reap_pods(time.time(), terminate=terminate, idle_minutes=idle_minutes,
                      dry_run=dry_run)
    _echo("\n".join(lines) if lines else "nothing to reap")


@app.command()
@_one_line_errors
def status(pod_ref: PodRef) -> None:
    """State, uptime, cost so far, the last logged step and loss (over SSH), TensorBoard URL."""
    pod = pods.find_pod(pod_ref)
    uptime = _uptime(pod)
    rate = float(pod.get("cost") or 0)
    step = remote.last_logged_step(pod)
    progress = (f"step {step['step']}, loss {float(step['loss']):.4f}" if step else
                "not available (no SSH yet, or no step logged)")
    deadline = pods.pod_env(pod).get("RUN_DEADLINE", "")
    rows = [
        ("pod", f"{pod.get('id')} '{pod.get('name')}'"),
        ("state", f"{pod.get('status')} ({_gpu(pod)})"),
        ("uptime", _duration(uptime)),
        ("cost", f"${uptime / 3600 * rate:.2f} so far at ${rate:.2f}/h"),
        ("training", progress),
        ("boot log", f"{remote.run_dir(pod)}/boot.log (orchestrate pod logs {pod.get('id')})"),
    ]
    if deadline.isdigit():
        when = datetime.fromtimestamp(int(deadline), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(("deadline", f"{when} (RUN_DEADLINE)"))
    if "6006/http" in (pod.get("ports") or []):
        rows.append(("tensorboard", pods.tensorboard_url(pod["id"])))
    for key, value in rows:
        _echo(f"{key:<12} {value}")


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def since_timestamp(value: str, now: datetime) -> str:
    """`--since`: RFC 3339 (2026-06-01T12:00:00Z) or a span back from now (90s, 10m, 2h, 1d)."""
    match = _RELATIVE.match(value.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        moment = now - timedelta(**{unit: int(match.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise pods.PodError(f"--since {value!r}: give a time like 2026-06-01T12:00:00Z or a "
                                "span like 10m, 2h, 1d") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@app.command()
@_one_line_errors
def logs(
    pod_ref: PodRef,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    tail: Annotated[int, typer.Option("--tail", "-n", help="Lines to start with (0-5000).")] = 100,
    since: Annotated[str | None, typer.Option(
        help="Only lines from this time on: 2026-06-01T12:00:00Z, or 10m, 2h, 1d back.")] = None,
    ssh: Annotated[bool, typer.Option(
        "--ssh", help="Fallback: tail runs/<experiment>/boot.log over direct SSH instead.")] = False,
) -> None:
    """Print the pod's logs from RunPod's REST v2 log stream (`/v2/pods/{id}/logs`)."""
    if not 0 <= tail <= 5000:
        raise pods.PodError(f"--tail {tail}: RunPod serves 0 to 5000 lines")
    pod = pods.find_pod(pod_ref)
    if ssh:
        _ssh_tail(pod, tail, follow)
        return
    start = since_timestamp(since, datetime.now(timezone.utc)) if since else None
    last_id: str | None = None
    while True:
        for event_id, event in rest.pod_logs(pod["id"], None if last_id else tail, start, last_id,
                                             idle_s=300 if follow else 5):
            last_id = event_id or last_id
            _echo(str(event.get("line", "")))
            sys.stdout.flush()
        if not follow:
            return
        time.sleep(1)  # the stream ended or went quiet: resume after the last event seen


def _ssh_tail(pod: dict[str, Any], lines: int, follow: bool) -> None:
    argv = remote.boot_log_command(pod, lines, follow)
    sys.stdout.flush()
    code = subprocess.run(argv, check=False).returncode
    if code != 0:
        raise pods.PodError(f"ssh to pod {pod['id']} ended with status {code} (is your SSH key "
                            "in the RunPod console, Settings > SSH Public Keys?)")


@volume_app.command("list")
@_one_line_errors
def volume_list(as_json: JsonFlag = False) -> None:
    """List your network volumes: id (for volumeMounts[0].volumeName), size, data center."""
    volumes = pods.list_volumes()
    if as_json:
        _echo(json.dumps(volumes, indent=2))
        return
    if not volumes:
        _echo("no network volumes (orchestrate volume create --help)")
        return
    table = Table("id", "name", "size (GB)", "data center", "type")
    for volume in volumes:
        table.add_row(volume.get("id", "?"), volume.get("name", ""), str(volume.get("size", "")),
                      volume.get("dataCenter", ""), volume.get("type", ""))
    Console(width=160).print(table)


def _manifest_gpus(path: Path) -> tuple[list[str], str]:
    """gpuType (as a list) and cloudType of a manifest, read before it has a volume id."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read gpuType from it ({type(exc).__name__})") from None
    gpus = data.get("gpuType") if isinstance(data, dict) else None
    gpus = [gpus] if isinstance(gpus, str) else gpus
    if not gpus or not all(isinstance(g, str) for g in gpus):
        raise ManifestError(f"{path}: gpuType: give one GPU type id or a list of them")
    return gpus, str(data.get("cloudType", "secure"))


@volume_app.command("create")
@_one_line_errors
def volume_create(
    name: Annotated[str, typer.Option(help="Volume name, e.g. transformer-shared.")],
    size: Annotated[int, typer.Option(help="Size in GB (10 to 4096).")],
    data_center: Annotated[str, typer.Option(
        help="Data center id (e.g. EU-RO-1) that has the GPU types you will rent.")],
    file: Annotated[Path, typer.Option(
        "--file", "-f", help="The manifest whose gpuType the data center must stock.")] = Path(
        "infra/runpod-pod.yaml"),
) -> None:
    """Create a network volume where the manifest's GPU types are in stock; put the printed id in
    the manifest's volumeMounts."""
    if not 10 <= size <= 4096:
        raise pods.PodError(f"--size {size}: a network volume is 10 to 4096 GB")
    gpus, cloud = _manifest_gpus(file)
    if cloud.lower() != "secure":
        raise ManifestError(f"{file}: cloudType: {cloud} cloud cannot mount a network volume: use "
                            "secure")
    center = rest.data_center(data_center)
    if center is None:
        raise pods.PodError(f"--data-center {data_center!r}: RunPod has no such data center")
    stock = {g["id"]: g["availability"] for g in center.get("gpuAvailability") or []}
    usable = [g for g in gpus if stock.get(g, "NONE") != "NONE"]
    if not usable:
        there = ", ".join(f"{g} ({level})" for g, level in stock.items() if level != "NONE")
        raise pods.PodError(f"--data-center {data_center}: none of {file}'s GPU types "
                            f"({', '.join(gpus)}) is in stock there (in stock: {there or 'none'}); "
                            "a pod must run in its volume's data center")
    volume = rest.create_volume(name, size, data_center)
    _echo(f"Created network volume {volume['id']} '{volume.get('name')}': {volume.get('size')} GB "
          f"in {volume.get('dataCenter')} (GPU stock there: "
          f"{', '.join(f'{g} {stock[g]}' for g in usable)})")
    _echo(f"  manifest     volumeMounts[0].volumeName: {volume['id']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["volume"]:
        volume_app(args=sys.argv[2:], prog_name="orchestrate volume")
    else:
        app(prog_name="orchestrate pod")

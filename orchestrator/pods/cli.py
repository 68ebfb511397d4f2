"""`orchestrate pod ...` (create from infra/runpod-pod.yaml, list, get, status, logs, stop, delete)
and `orchestrate volume ...` (network volumes: list, create).

runpodctl has no manifest flag (`runpodctl create pod -f` does not exist), no logs command and no
port-forward, so these are the commands the seed's quickstart needed. Mounted by the main CLI as
`orchestrate pod` / `orchestrate volume`; runnable alone as `python -m orchestrator.pods.cli` (pod)
and `python -m orchestrator.pods.cli volume ...`. Every failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.pods import api as pods
from orchestrator.pods import remote
from orchestrator.pods.manifest import ManifestError, load_manifest

F = TypeVar("F", bound=Callable[..., Any])
PodId = Annotated[str, typer.Argument(metavar="ID", help="A pod id, as `list` shows it.")]
PodRef = Annotated[str, typer.Argument(metavar="NAME|ID", help="A pod's id or name.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print RunPod's record(s) as JSON.")]



def _typer(name: str, what: str) -> typer.Typer:
    return typer.Typer(name=name, help=f"{what} (reads RUNPOD_API_KEY; never prints it).",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = _typer("pod", "RunPod pods from infra/runpod-pod.yaml")
volume_app = _typer("volume", "RunPod network volumes")


def _one_line_errors(command: F) -> F:
    """User errors (bad manifest, RunPod refusals) end as one stderr line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ManifestError, pods.PodError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _follow_lines(pod: dict[str, Any], request: pods.PodRequest) -> list[str]:
    pod_id = pod["id"]
    env = {item["key"]: item["value"] for item in request.input["env"]}
    experiment = env.get("RUN_EXPERIMENT", "runpod-1b")
    lines = [
        "Follow it:",
        f"  logs         orchestrate pod logs {pod_id} --follow    (over SSH, once it runs)",
        f"  status       orchestrate pod status {pod_id}",
    ]
    ssh = pods.ssh_commands(pod)
    if ssh:
        lines.append(f"  ssh          {ssh[0]}")
    lines.append(f"               (direct TCP ssh: `orchestrate pod get {pod_id}` once it runs)")
    if "6006/http" in request.input["ports"].split(","):
        lines.append(f"  tensorboard  {pods.tensorboard_url(pod_id)}")
    lines += [
        f"  boot log     /workspace/runs/{experiment}/boot.log (on the volume)",
        f"  stop         orchestrate pod stop {pod_id}    (GPU billing stops, volume kept)",
        f"  delete       orchestrate pod delete {pod_id}",
    ]
    return lines


@app.command()
@_one_line_errors
def create(
    file: Annotated[Path, typer.Option("--file", "-f", help="The pod manifest.")],
    dry_run: Annotated[bool, typer.Option(help="Print the exact request; create nothing.")] = False,
    config: Annotated[str | None, typer.Option(help="Override env RUN_CONFIG.")] = None,
    experiment: Annotated[str | None, typer.Option(help="Override env RUN_EXPERIMENT.")] = None,
    shard: Annotated[bool | None, typer.Option("--shard/--no-shard", help="RUN_SHARD 1/0.")] = None,
    shard_lines: Annotated[int | None, typer.Option(min=1, help="Override SHARD_LINES.")] = None,
    force: Annotated[bool, typer.Option(
        help="Create even if a pod already runs this experiment on this volume.")] = False,
) -> None:
    """Create a pod from a manifest (validated first; nothing is sent when it is invalid)."""
    manifest = load_manifest(file).with_overrides(
        config=config, experiment=experiment, shard=shard, shard_lines=shard_lines
    )
    if dry_run:
        can_resolve = pods.has_api_key()
        request = pods.resolve_request(manifest) if can_resolve else pods.build_request(manifest)
        typer.echo(pods.describe_request(request))
        typer.echo("# dry run: nothing was created")
        return
    pod, request = pods.create_pod(manifest, force=force)
    inp = request.input
    kind = "spot" if request.spot else "on demand"
    price = request.hourly_price()
    cost = f", about ${price:.2f}/h" if price is not None else ""
    typer.echo(
        f"Created pod {pod['id']} '{inp['name']}': {inp['gpuCount']} x {inp['gpuTypeId']}, "
        f"{manifest.cloud_type} cloud, {kind}{cost}; RunPod stops it at {inp['stopAfter']}"
    )
    typer.echo("\n".join(_follow_lines(pod, request)))


def _gpu(pod: dict[str, Any]) -> str:
    name = (pod.get("machine") or {}).get("gpuDisplayName") or "?"
    return f"{pod.get('gpuCount') or 0} x {name}"


@app.command("list")
@_one_line_errors
def list_(as_json: JsonFlag = False) -> None:
    """List your pods."""
    records = pods.list_pods()
    if as_json:
        typer.echo(json.dumps([_public(p) for p in records], indent=2))
        return
    if not records:
        typer.echo("no pods")
        return
    table = Table("id", "name", "status", "type", "gpu", "$/h", "uptime", "image")
    for pod in records:
        uptime = pod.get("uptimeSeconds") or 0
        table.add_row(
            pod.get("id", "?"),
            pod.get("name", ""),
            pod.get("desiredStatus", ""),
            pod.get("podType") or "",
            _gpu(pod),
            f"{pod.get('costPerHr') or 0:.2f}",
            f"{uptime // 3600}h{uptime % 3600 // 60:02d}m",
            pod.get("imageName", ""),
        )
    Console(width=160).print(table)


def _public(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod record safe to print: env values of secrets hidden."""
    if "env" in pod:
        return {**pod, "env": pods.masked_env(pod["env"])}
    return pod


@app.command()
@_one_line_errors
def get(pod_id: PodId, as_json: JsonFlag = False) -> None:
    """Show one pod: status, cost, SSH, TensorBoard address, env (secrets hidden)."""
    pod = pods.get_pod(pod_id)
    if as_json:
        typer.echo(json.dumps(_public(pod), indent=2))
        return
    ports = pod.get("ports") or ""
    rows = [
        ("id", pod.get("id")),
        ("name", pod.get("name")),
        ("status", pod.get("desiredStatus")),
        ("type", pod.get("podType")),
        ("gpu", _gpu(pod)),
        ("cost", f"${pod.get('costPerHr') or 0:.2f}/h"),
        ("uptime", f"{pod.get('uptimeSeconds') or 0}s"),
        ("image", pod.get("imageName")),
        ("command", pod.get("dockerArgs") or "(image default)"),
        ("volume", pod.get("volumeMountPath")),
        ("ports", ports),
        ("logs", f"orchestrate pod logs {pod_id} --follow"),
    ]
    rows += [("ssh", command) for command in pods.ssh_commands(pod)]
    if not pod.get("runtime"):
        rows.append(("runtime", "not running yet (starting, pulling the image, or stopped)"))
    if "6006/http" in ports.split(","):
        rows.append(("tensorboard", pods.tensorboard_url(pod_id)))
    rows += [("env", line) for line in pods.masked_env(pod.get("env"))]
    for key, value in rows:
        typer.echo(f"{key:<12} {value if value is not None else ''}")


@app.command()
@_one_line_errors
def stop(pod_id: PodId) -> None:
    """Stop a pod: its GPU is released (no GPU billing); /workspace on the volume stays."""
    answer = pods.stop_pod(pod_id)
    typer.echo(f"pod {pod_id}: {answer.get('desiredStatus', 'stop requested')}")


@app.command()
@_one_line_errors
def delete(pod_id: PodId) -> None:
    """Delete (terminate) a pod for good; the network volume is not touched."""
    pods.terminate_pod(pod_id)
    typer.echo(f"pod {pod_id}: deleted")


def _duration(seconds: int) -> str:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command()
@_one_line_errors
def status(pod_ref: PodRef) -> None:
    """State, uptime, cost so far, the last logged step and loss (over SSH), TensorBoard URL."""
    pod = pods.find_pod(pod_ref)
    uptime = int(pod.get("uptimeSeconds") or 0)
    rate = float(pod.get("costPerHr") or 0)
    step = remote.last_logged_step(pod)
    progress = (f"step {step['step']}, loss {float(step['loss']):.4f}" if step else
                "not available (no SSH yet, or no step logged)")
    rows = [
        ("pod", f"{pod.get('id')} '{pod.get('name')}'"),
        ("state", f"{pod.get('desiredStatus')} ({pod.get('podType') or '?'}, {_gpu(pod)})"),
        ("uptime", _duration(uptime)),
        ("cost", f"${uptime / 3600 * rate:.2f} so far at ${rate:.2f}/h"),
        ("training", progress),
        ("boot log", f"{remote.run_dir(pod)}/boot.log (orchestrate pod logs {pod.get('id')})"),
    ]
    if "6006/http" in (pod.get("ports") or "").split(","):
        rows.append(("tensorboard", pods.tensorboard_url(pod["id"])))
    for key, value in rows:
        typer.echo(f"{key:<12} {value}")


@app.command()
@_one_line_errors
def logs(
    pod_ref: PodRef,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Lines to show.")] = 100,
) -> None:
    """Print the pod's boot log (runs/<experiment>/boot.log on the volume) over direct SSH."""
    pod = pods.find_pod(pod_ref)
    argv = remote.boot_log_command(pod, lines, follow)
    sys.stdout.flush()
    code = subprocess.run(argv, check=False).returncode
    if code != 0:
        typer.echo(f"error: ssh to pod {pod['id']} ended with status {code} "
                   "(is your SSH key in the RunPod console, Settings > SSH Public Keys?)", err=True)
        raise typer.Exit(1)


@volume_app.command("list")
@_one_line_errors
def volume_list(as_json: JsonFlag = False) -> None:
    """List your network volumes: id (for volumeMounts[0].volumeName), size, data center."""
    volumes = pods.list_volumes()
    if as_json:
        typer.echo(json.dumps(volumes, indent=2))
        return
    if not volumes:
        typer.echo("no network volumes (orchestrate volume create --help)")
        return
    table = Table("id", "name", "size (GB)", "data center")
    for volume in volumes:
        table.add_row(volume.get("id", "?"), volume.get("name", ""), str(volume.get("size", "")),
                      volume.get("dataCenterId", ""))
    Console(width=160).print(table)


@volume_app.command("create")
@_one_line_errors
def volume_create(
    name: Annotated[str, typer.Option(help="Volume name, e.g. transformer-shared.")],
    size: Annotated[int, typer.Option(min=10, max=4000, help="Size in GB.")],
    data_center: Annotated[str, typer.Option(
        help="Data center id (e.g. EU-RO-1) that has the GPU types you will rent.")],
) -> None:
    """Create a network volume; put the printed id in the manifest's volumeMounts."""
    volume = pods.create_volume(name, size, data_center)
    typer.echo(f"Created network volume {volume['id']} '{volume.get('name')}': "
               f"{volume.get('size')} GB in {volume.get('dataCenterId')}")
    typer.echo(f"  manifest     volumeMounts[0].volumeName: {volume['id']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["volume"]:
        volume_app(args=sys.argv[2:], prog_name="orchestrate volume")
    else:
        app(prog_name="orchestrate pod")

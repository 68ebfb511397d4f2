"""`orchestrate pod ...`: create a RunPod pod from infra/runpod-pod.yaml, list, get, stop, delete.

runpodctl has no manifest flag (`runpodctl create pod -f` does not exist) and no port-forward, so
this is the command the seed's quickstart needed. Mounted by the main CLI as `orchestrate pod`;
runnable alone as `python -m orchestrator.pods.cli`. Every failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.pods import api as pods
from orchestrator.pods.manifest import ManifestError, load_manifest

F = TypeVar("F", bound=Callable[..., Any])
PodId = Annotated[str, typer.Argument(metavar="ID", help="A pod id, as `list` shows it.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print RunPod's record(s) as JSON.")]

app = typer.Typer(
    name="pod",
    help="RunPod pods from infra/runpod-pod.yaml (reads RUNPOD_API_KEY; never prints it).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _one_line_errors(command: F) -> F:
    """User errors (bad manifest, RunPod refusals) end as one stderr line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ManifestError, pods.PodError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _follow_lines(pod: dict[str, Any], request: pods.PodRequest) -> list[str]:
    pod_id = pod["id"]
    experiment = request.kwargs["env"].get("RUN_EXPERIMENT", "runpod-1b")
    lines = [
        "Follow it:",
        f"  logs         runpodctl pod logs {pod_id} --follow",
        f"  status       orchestrate pod get {pod_id}",
    ]
    ssh = pods.ssh_commands(pod)
    if ssh:
        lines.append(f"  ssh          {ssh[0]}")
    lines.append(f"               (direct TCP ssh: `orchestrate pod get {pod_id}` once it runs)")
    if "6006/http" in request.kwargs["ports"].split(","):
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
    pod, request = pods.create_pod(manifest)
    kind = "spot" if request.spot else "on demand"
    price = request.hourly_price()
    cost = f", about ${price:.2f}/h" if price is not None else ""
    typer.echo(
        f"Created pod {pod['id']} '{request.kwargs['name']}': {request.kwargs['gpu_count']} x "
        f"{request.kwargs['gpu_type_id']}, {manifest.cloud_type} cloud, {kind}{cost}"
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
        ("logs", f"runpodctl pod logs {pod_id} --follow"),
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


if __name__ == "__main__":
    app(prog_name="orchestrate pod")

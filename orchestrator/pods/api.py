"""Every call to RunPod goes through this module, and it is the only one that imports `runpod`.

Why one module: the SDK (pinned 1.12) speaks RunPod's GraphQL API, which RunPod plans to retire;
keeping every call here makes the swap to its REST API one file. The SDK has sharp edges this
module files off:

- it never reads RUNPOD_API_KEY (only ~/.runpod/config.toml at import): we set `runpod.api_key`
  from the environment on every call and never print it;
- `create_pod` mounts volumes at /runpod-volume unless told `volume_mount_path="/workspace"`;
- it has no spot option: a spot pod is RunPod's `podRentInterruptable` mutation, which takes the
  same input as the SDK's on-demand mutation plus `bidPerGpu`, sent with `run_graphql_query`;
- its errors (AuthenticationError for a 401, QueryError for GraphQL errors such as "no capacity",
  ValueError for an unknown GPU type, requests errors for the network) become one-line PodErrors.

The SDK is imported lazily: it costs about two seconds, which `--dry-run` without a key never pays.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator.pods.manifest import (
    PodManifest,
    is_secret_name,
    is_secret_reference,
    looks_like_literal_token,
)

T = TypeVar("T")

_CLOUD_TYPES = {"secure": "SECURE", "community": "COMMUNITY", "all": "ALL"}
_POD_ID = re.compile(r"^[A-Za-z0-9]+$")
_NO_CAPACITY = re.compile(
    r"no longer any instances|not enough|no (gpu|instance|machine)s? available|capacity",
    re.IGNORECASE,
)


class PodError(RuntimeError):
    """A RunPod request that failed, as one line fit for a terminal (never carries the API key)."""


@dataclass(frozen=True)
class PodRequest:
    """Exactly what `create_pod` sends: the SDK call's kwargs and, for spot, the GraphQL text.

    `data_center_id` is None until resolved from the network volume (the pod must land in the
    volume's data center); `gpu` is RunPod's answer for the GPU type (prices) once looked up.
    """

    kwargs: dict[str, Any]
    spot: bool
    bid_per_gpu: float | None
    gpu: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def resolved(self) -> bool:
        return self.kwargs.get("data_center_id") is not None

    def graphql(self) -> str:
        """The mutation text: the SDK's own on-demand mutation, renamed and bid for spot."""
        from runpod.api.mutations.pods import generate_pod_deployment_mutation

        text = generate_pod_deployment_mutation(**self.kwargs)
        if not self.spot:
            return text
        if text.count("podFindAndDeployOnDemand(") != 1 or text.count("input: {") != 1:
            raise PodError("the installed runpod SDK changed its pod mutation; pin runpod==1.12.*")
        text = text.replace("podFindAndDeployOnDemand(", "podRentInterruptable(")
        return text.replace("input: {", f"input: {{\n          bidPerGpu: {self.bid_per_gpu!r},")

    def hourly_price(self) -> float | None:
        """$/h for the whole pod: the bid for spot, else RunPod's list price (None if unknown)."""
        if self.spot and self.bid_per_gpu is not None:
            return self.bid_per_gpu * self.kwargs["gpu_count"]
        keys = {"SECURE": ["securePrice"], "COMMUNITY": ["communityPrice"]}
        names = keys.get(self.kwargs["cloud_type"], ["securePrice", "communityPrice"])
        prices = [(self.gpu or {}).get(name) for name in names]
        known = [p for p in prices if isinstance(p, (int, float)) and p > 0]
        return min(known) * self.kwargs["gpu_count"] if known else None


@functools.cache
def _import_runpod() -> tuple[Any, str | None]:
    """The SDK, and the key its import read from ~/.runpod/config.toml (before we set ours)."""
    import runpod

    return runpod, runpod.api_key


def _sdk() -> Any:
    """Import runpod and give it the key from RUNPOD_API_KEY (or the SDK's own config file)."""
    runpod, config_key = _import_runpod()
    key = os.environ.get("RUNPOD_API_KEY", "").strip() or config_key
    if not key:
        raise PodError(
            "RUNPOD_API_KEY is not set: create a key in the RunPod console (Settings > API Keys) "
            "and export RUNPOD_API_KEY=... (it is never printed)"
        )
    runpod.api_key = key
    return runpod


def has_api_key() -> bool:
    """Whether a key is at hand (RUNPOD_API_KEY, or the SDK's ~/.runpod/config.toml)."""
    config = os.path.join(os.path.expanduser("~"), ".runpod", "config.toml")
    return bool(os.environ.get("RUNPOD_API_KEY", "").strip()) or os.path.isfile(config)


def _api_base() -> str:
    return os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io")


def _redact(text: str) -> str:
    """Collapse to one line and blank out the API key should a server ever echo it."""
    line = " ".join(str(text).split())
    runpod = sys.modules.get("runpod")
    for key in (os.environ.get("RUNPOD_API_KEY", "").strip(), getattr(runpod, "api_key", None)):
        if key:
            line = line.replace(key, "***")
    return line


def _call(action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one SDK call; map every failure it can raise to a PodError naming `action`."""
    import requests
    from runpod import error as rp_error

    try:
        return fn(*args, **kwargs)
    except rp_error.AuthenticationError as exc:
        raise PodError(
            f"cannot {action}: RunPod rejected the API key ({_redact(exc)}); "
            "check RUNPOD_API_KEY (console > Settings > API Keys)"
        ) from None
    except rp_error.QueryError as exc:
        message = _redact(exc)
        hint = ""
        if _NO_CAPACITY.search(message):
            hint = " (no capacity: try cloudType: all, another gpuType, fewer GPUs, or later)"
        raise PodError(f"cannot {action}: RunPod answered: {message}{hint}") from None
    except requests.RequestException as exc:
        raise PodError(
            f"cannot {action}: no usable answer from the RunPod API at {_api_base()} "
            f"({type(exc).__name__})"
        ) from None
    except (KeyError, TypeError) as exc:  # the SDK indexes answers blindly: data null, key gone
        raise PodError(
            f"cannot {action}: unexpected answer from RunPod ({type(exc).__name__}: {exc})"
        ) from None


def build_request(manifest: PodManifest) -> PodRequest:
    """The create request for a manifest, before any lookup (no network, no key)."""
    return PodRequest(
        kwargs={
            "name": manifest.pod_name,
            "image_name": manifest.image,
            "gpu_type_id": manifest.gpu_type,
            "gpu_count": manifest.gpu_count,
            "cloud_type": _CLOUD_TYPES[manifest.cloud_type],
            "support_public_ip": True,
            "start_ssh": True,
            "container_disk_in_gb": manifest.container_disk_in_gb,
            "volume_in_gb": 0,
            "min_vcpu_count": manifest.min_vcpu_count,
            "min_memory_in_gb": manifest.min_memory_in_gb,
            "docker_args": manifest.command,
            "ports": ",".join(manifest.ports),
            "volume_mount_path": manifest.volume_mounts[0].mount_path,
            "network_volume_id": manifest.volume_id,
            "data_center_id": None,
            "env": dict(manifest.env),
        },
        spot=manifest.spot,
        bid_per_gpu=manifest.bid_per_gpu if manifest.spot else None,
    )


def resolve_request(manifest: PodManifest) -> PodRequest:
    """Check the GPU type and the volume with read-only queries; pin the volume's data center."""
    runpod = _sdk()
    request = build_request(manifest)
    gpu_id = manifest.gpu_type
    try:
        gpu = _call(f"look up GPU type {gpu_id!r}", runpod.get_gpu, gpu_id, manifest.gpu_count)
    except ValueError:
        raise PodError(
            f"gpuType: RunPod has no GPU type {gpu_id!r} (ids look like 'NVIDIA A100 80GB PCIe', "
            "'NVIDIA H100 80GB HBM3')"
        ) from None
    user = _call("list your network volumes", runpod.get_user)
    volumes = user.get("networkVolumes") or []
    volume = next((v for v in volumes if v.get("id") == manifest.volume_id), None)
    if volume is None:
        yours = ", ".join(f"{v.get('id')} ({v.get('name')}, {v.get('dataCenterId')})"
                          for v in volumes) or "none"
        raise PodError(
            f"volumeMounts[0].volumeName: network volume {manifest.volume_id!r} is not in this "
            f"RunPod account (yours: {yours})"
        )
    kwargs = dict(request.kwargs, data_center_id=volume["dataCenterId"])
    return PodRequest(kwargs=kwargs, spot=request.spot, bid_per_gpu=request.bid_per_gpu, gpu=gpu)


def create_pod(manifest: PodManifest) -> tuple[dict[str, Any], PodRequest]:
    """Create the pod a manifest describes; return RunPod's pod record and the request sent."""
    request = resolve_request(manifest)
    runpod = _sdk()
    if request.spot:
        from runpod.api.graphql import run_graphql_query

        answer = _call("create the spot pod", run_graphql_query, request.graphql())
        pod = (answer.get("data") or {}).get("podRentInterruptable")
    else:
        pod = _call("create the pod", runpod.create_pod, **request.kwargs)
    if not pod or not pod.get("id"):
        raise PodError("cannot create the pod: RunPod answered without a pod id")
    return pod, request


def _checked_id(pod_id: str) -> str:
    if not _POD_ID.match(pod_id):
        raise PodError(f"pod id {pod_id!r}: RunPod pod ids are letters and digits only")
    return pod_id


def list_pods() -> list[dict[str, Any]]:
    runpod = _sdk()
    return _call("list pods", runpod.get_pods) or []


def get_pod(pod_id: str) -> dict[str, Any]:
    runpod = _sdk()
    pod = _call(f"get pod {pod_id}", runpod.get_pod, _checked_id(pod_id))
    if not pod:
        raise PodError(f"pod {pod_id}: no such pod in this RunPod account")
    return pod


def stop_pod(pod_id: str) -> dict[str, Any]:
    """Stop: the GPU is released and billing for it stops; the volume and the pod record stay."""
    runpod = _sdk()
    return _call(f"stop pod {pod_id}", runpod.stop_pod, _checked_id(pod_id)) or {}


def terminate_pod(pod_id: str) -> None:
    """Delete the pod for good (the network volume is untouched)."""
    runpod = _sdk()
    _call(f"delete pod {pod_id}", runpod.terminate_pod, _checked_id(pod_id))


def tensorboard_url(pod_id: str) -> str:
    """RunPod's HTTP proxy address for port 6006 (no port-forward exists or is needed)."""
    return f"https://{pod_id}-6006.proxy.runpod.net"


def ssh_commands(pod: dict[str, Any]) -> list[str]:
    """How to SSH in: RunPod's proxy (any image) and, once running, direct TCP on a public IP."""
    commands = []
    host_id = (pod.get("machine") or {}).get("podHostId")
    if host_id:
        commands.append(f"ssh {host_id}@ssh.runpod.io -i ~/.ssh/id_ed25519")
    for port in ((pod.get("runtime") or {}).get("ports") or []):
        if port.get("privatePort") == 22 and port.get("isIpPublic"):
            commands.append(f"ssh root@{port['ip']} -p {port['publicPort']} -i ~/.ssh/id_ed25519")
    return commands


def masked_env(env: Any) -> list[str]:
    """A pod's env as KEY=value lines with every secret value hidden (references are shown)."""
    if isinstance(env, dict):
        items = list(env.items())
    else:
        items = [tuple(str(e).split("=", 1)) if "=" in str(e) else (str(e), "") for e in env or []]
    lines = []
    for key, value in items:
        hidden = is_secret_name(key) and not is_secret_reference(value)
        secret = hidden or looks_like_literal_token(value)
        lines.append(f"{key}={'<hidden>' if secret else value}")
    return lines


def describe_request(request: PodRequest) -> str:
    """The dry-run text: the SDK call with its kwargs (JSON) and, for spot, the GraphQL sent."""
    lines = [
        f"# POST {_api_base()}/graphql with 'Authorization: Bearer $RUNPOD_API_KEY' (not shown)",
        "# secrets travel only as RunPod secret references, resolved by RunPod inside the pod",
    ]
    if not request.resolved:
        lines.append(
            "# data_center_id: filled in at create time from the network volume "
            "(set RUNPOD_API_KEY to resolve it and check the GPU type and volume now)"
        )
    price = request.hourly_price()
    if price is not None:
        lines.append(f"# price: about ${price:.2f}/h for this pod")
    body = json.dumps(request.kwargs, indent=2)
    if not request.spot:
        return "\n".join([*lines, f"runpod.create_pod(**{body})"])
    lines += [
        "# spot: the SDK has no spot option, so this GraphQL goes through",
        "# runpod.api.graphql.run_graphql_query; the SDK's generate_pod_deployment_mutation",
        "# builds it from these arguments, renamed to podRentInterruptable with bidPerGpu:",
        body,
        textwrap.dedent(request.graphql()).strip(),
    ]
    return "\n".join(lines)

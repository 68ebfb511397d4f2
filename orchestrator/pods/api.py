"""Every call to RunPod goes through this module, and it is the only one that imports `runpod`.

Why one module: RunPod plans to retire its GraphQL API (which the pinned SDK, 1.12, speaks) in
2027; keeping every call here makes the move to its REST API one file. Reads (GPU types, volumes,
pods) go through the SDK. Writes are sent here as GraphQL *variables* (`{"query": ..., "variables":
{"input": {...}}}`), because the SDK pastes values into its mutation text unescaped: a quote, a
backslash or a newline in a start command would break or rewrite the request. With variables no
value is refused for its characters and none can change the query. Other sharp edges filed off:

- the SDK never reads RUNPOD_API_KEY (only ~/.runpod/config.toml at import): we set `runpod.api_key`
  from the environment on every call and never print it;
- a spot pod is RunPod's `podRentInterruptable` (the SDK has none): the on-demand input plus
  `bidPerGpu`;
- errors (401, GraphQL errors such as "no capacity", an unknown GPU type, network failures) become
  one-line PodErrors; "no capacity" moves on to the manifest's next GPU type.

The SDK is imported lazily: it costs about two seconds, which `--dry-run` without a key never pays.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
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
#: Pod states that still hold (or are about to hold) a GPU.
_INACTIVE = {"EXITED", "TERMINATED"}
_POD_FIELDS = "id name imageName desiredStatus costPerHr env machineId machine { podHostId }"
_DEPLOY = ("mutation deploy($input: PodFindAndDeployOnDemandInput!) "
           f"{{ podFindAndDeployOnDemand(input: $input) {{ {_POD_FIELDS} }} }}")
_RENT = ("mutation rent($input: PodRentInterruptableInput!) "
         f"{{ podRentInterruptable(input: $input) {{ {_POD_FIELDS} }} }}")
_CREATE_VOLUME = ("mutation volume($input: CreateNetworkVolumeInput!) "
                  "{ createNetworkVolume(input: $input) { id name size dataCenterId } }")


class PodError(RuntimeError):
    """A RunPod request that failed, as one line fit for a terminal (never carries the API key)."""

    def __init__(self, message: str, no_capacity: bool = False) -> None:
        super().__init__(message)
        self.no_capacity = no_capacity


@dataclass(frozen=True)
class PodRequest:
    """Exactly what `create_pod` sends: the mutation's `input` variable, and the GPU types to try.

    `input["gpuTypeId"]` is the first type; `create_pod` moves to the next on "no capacity".
    `dataCenterId` is None until resolved from the network volume (the pod must land in the
    volume's data center); `gpus` are RunPod's answers for the GPU types (prices) once looked up.
    """

    input: dict[str, Any]
    spot: bool
    gpu_types: list[str]
    gpus: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def resolved(self) -> bool:
        return self.input.get("dataCenterId") is not None

    @property
    def query(self) -> str:
        return _RENT if self.spot else _DEPLOY

    def for_gpu(self, gpu_type: str) -> PodRequest:
        return replace(self, input={**self.input, "gpuTypeId": gpu_type})

    def hourly_price(self) -> float | None:
        """$/h for the whole pod: the bid for spot, else RunPod's list price (None if unknown)."""
        count = self.input["gpuCount"]
        if self.spot:
            return self.input["bidPerGpu"] * count
        keys = {"SECURE": ["securePrice"], "COMMUNITY": ["communityPrice"]}
        names = keys.get(self.input["cloudType"], ["securePrice", "communityPrice"])
        gpu = self.gpus.get(self.input["gpuTypeId"]) or {}
        known = [p for p in (gpu.get(n) for n in names) if isinstance(p, (int, float)) and p > 0]
        return min(known) * count if known else None


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
    """Run one API call; map every failure it can raise to a PodError naming `action`."""
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
        full = bool(_NO_CAPACITY.search(message))
        hint = " (no capacity: try cloudType: all, more gpuType entries, fewer GPUs, or later)"
        raise PodError(f"cannot {action}: RunPod answered: {message}{hint if full else ''}",
                       no_capacity=full) from None
    except requests.RequestException as exc:  # requests' JSONDecodeError is one too
        raise PodError(
            f"cannot {action}: no usable answer from the RunPod API at {_api_base()} "
            f"({type(exc).__name__})"
        ) from None
    except (KeyError, TypeError) as exc:  # the SDK indexes answers blindly: data null, key gone
        raise PodError(
            f"cannot {action}: unexpected answer from RunPod ({type(exc).__name__}: {exc})"
        ) from None


def _graphql(query: str, variables: dict[str, Any]) -> dict[str, Any]:
    """POST a GraphQL operation with its values as variables, as the SDK would post a query
    (same URL, headers and error classes), so `_call` maps its failures the same way."""
    import requests
    from runpod import error as rp_error
    from runpod.user_agent import USER_AGENT

    runpod = _sdk()
    response = requests.post(
        f"{_api_base()}/graphql",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT,
                 "Authorization": f"Bearer {runpod.api_key}"},
        data=json.dumps({"query": query, "variables": variables}),
        timeout=30,
    )
    if response.status_code == 401:
        raise rp_error.AuthenticationError("Unauthorized request, please check your API key.")
    body = response.json()
    if body.get("errors"):
        raise rp_error.QueryError(body["errors"][0].get("message", "error"), query)
    return body.get("data") or {}


def _deadline(hours: float | None, now: datetime) -> str | None:
    if hours is None:
        return None
    return (now + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_request(manifest: PodManifest, now: datetime | None = None) -> PodRequest:
    """The create request for a manifest, before any lookup (no network, no key)."""
    now = now or datetime.now(timezone.utc)
    inp: dict[str, Any] = {
        "name": manifest.pod_name,
        "imageName": manifest.image,
        "gpuTypeId": manifest.gpu_types[0],
        "gpuCount": manifest.gpu_count,
        "cloudType": _CLOUD_TYPES[manifest.cloud_type],
        "supportPublicIp": True,
        "startSsh": True,
        "containerDiskInGb": manifest.container_disk_in_gb,
        "volumeInGb": 0,
        "minVcpuCount": manifest.min_vcpu_count,
        "minMemoryInGb": manifest.min_memory_in_gb,
        "dockerArgs": manifest.command,
        "ports": ",".join(manifest.ports),
        "volumeMountPath": manifest.volume_mounts[0].mount_path,
        "networkVolumeId": manifest.volume_id,
        "dataCenterId": None,
        "allowedCudaVersions": manifest.cuda_versions,
        "stopAfter": _deadline(manifest.max_runtime_hours, now),
        "env": [{"key": k, "value": v} for k, v in manifest.pod_env().items()],
    }
    if manifest.terminate_after_hours is not None:
        inp["terminateAfter"] = _deadline(manifest.terminate_after_hours, now)
    if manifest.spot:
        inp["bidPerGpu"] = manifest.bid_per_gpu
    return PodRequest(input=inp, spot=manifest.spot, gpu_types=manifest.gpu_types)


def resolve_request(manifest: PodManifest) -> PodRequest:
    """Check the GPU types and the volume with read-only queries; pin the volume's data center."""
    runpod = _sdk()
    request = build_request(manifest)
    gpus = {}
    for i, gpu_id in enumerate(request.gpu_types):
        try:
            gpus[gpu_id] = _call(f"look up GPU type {gpu_id!r}", runpod.get_gpu, gpu_id,
                                 manifest.gpu_count)
        except ValueError:
            key = "gpuType" if len(request.gpu_types) == 1 else f"gpuType[{i}]"
            raise PodError(
                f"{key}: RunPod has no GPU type {gpu_id!r} (ids look like 'NVIDIA A100 80GB "
                "PCIe', 'NVIDIA H100 80GB HBM3')"
            ) from None
    volumes = list_volumes()
    volume = next((v for v in volumes if v.get("id") == manifest.volume_id), None)
    if volume is None:
        yours = ", ".join(f"{v.get('id')} ({v.get('name')}, {v.get('dataCenterId')})"
                          for v in volumes) or "none"
        raise PodError(
            f"volumeMounts[0].volumeName: network volume {manifest.volume_id!r} is not in this "
            f"RunPod account (yours: {yours})"
        )
    inp = {**request.input, "dataCenterId": volume["dataCenterId"]}
    return replace(request, input=inp, gpus=gpus)


def pod_env(pod: dict[str, Any]) -> dict[str, str]:
    """A pod record's env ("KEY=value" strings in RunPod's answers) as a dict."""
    env = pod.get("env") or []
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items()}
    return dict(str(item).split("=", 1) for item in env if "=" in str(item))


def running_twin(manifest: PodManifest) -> dict[str, Any] | None:
    """A pod that is not stopped and trains the same experiment on the same volume, if any.

    Two such pods would write the same checkpoints and shards on one volume: the later save wins
    and both runs are corrupted.
    """
    for pod in list_pods():
        if pod.get("desiredStatus") in _INACTIVE:
            continue
        env = pod_env(pod)
        same_volume = env.get("RUN_VOLUME_ID", manifest.volume_id) == manifest.volume_id
        if env.get("RUN_EXPERIMENT") == manifest.experiment and same_volume:
            return pod
    return None


def create_pod(manifest: PodManifest, force: bool = False) -> tuple[dict[str, Any], PodRequest]:
    """Create the pod a manifest describes, trying its GPU types in order; return RunPod's pod
    record and the request that succeeded."""
    request = resolve_request(manifest)
    twin = None if force else running_twin(manifest)
    if twin is not None:
        raise PodError(
            f"pod {twin.get('id')} ({twin.get('name')}, {twin.get('desiredStatus')}) already runs "
            f"experiment {manifest.experiment!r} on volume {manifest.volume_id}: stop it first "
            "(orchestrate pod stop ID), or pass --force"
        )
    operation = "podRentInterruptable" if request.spot else "podFindAndDeployOnDemand"
    failures = []
    for gpu_type in request.gpu_types:
        attempt = request.for_gpu(gpu_type)
        try:
            data = _call(f"create the pod on {gpu_type}", _graphql, attempt.query,
                         {"input": attempt.input})
        except PodError as exc:
            if not exc.no_capacity or gpu_type == request.gpu_types[-1]:
                if failures:
                    raise PodError(f"{exc} (also no capacity for: {', '.join(failures)})",
                                   no_capacity=exc.no_capacity) from None
                raise
            failures.append(gpu_type)
            continue
        pod = data.get(operation)
        if not pod or not pod.get("id"):
            raise PodError("cannot create the pod: RunPod answered without a pod id")
        return pod, attempt
    raise AssertionError("unreachable: the manifest lists at least one GPU type")


def list_volumes() -> list[dict[str, Any]]:
    runpod = _sdk()
    user = _call("list your network volumes", runpod.get_user)
    return user.get("networkVolumes") or []


def create_volume(name: str, size_gb: int, data_center: str) -> dict[str, Any]:
    """A network volume (billed per GB-month whether or not a pod runs)."""
    data = _call(f"create network volume {name!r}", _graphql, _CREATE_VOLUME,
                 {"input": {"name": name, "size": size_gb, "dataCenterId": data_center}})
    volume = data.get("createNetworkVolume")
    if not volume or not volume.get("id"):
        raise PodError("cannot create the network volume: RunPod answered without an id")
    return volume


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


def find_pod(name_or_id: str) -> dict[str, Any]:
    """A pod by id, or by name (the newest-listed pod not stopped wins over stopped ones)."""
    pods = list_pods()
    matches = [p for p in pods if p.get("id") == name_or_id] or [
        p for p in pods if p.get("name") == name_or_id]
    if not matches:
        raise PodError(f"{name_or_id!r}: no pod with that id or name in this RunPod account "
                       "(orchestrate pod list)")
    active = [p for p in matches if p.get("desiredStatus") not in _INACTIVE]
    if len(active) > 1:
        ids = ", ".join(p.get("id", "?") for p in active)
        raise PodError(f"{name_or_id!r}: several pods run with that name ({ids}); use an id")
    return get_pod((active or matches)[0]["id"])


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


def ssh_address(pod: dict[str, Any]) -> tuple[str, int] | None:
    """(public IP, port) of the pod's direct TCP SSH, once it runs with `22/tcp` exposed."""
    for port in ((pod.get("runtime") or {}).get("ports") or []):
        if port.get("privatePort") == 22 and port.get("isIpPublic"):
            return str(port["ip"]), int(port["publicPort"])
    return None


def ssh_commands(pod: dict[str, Any]) -> list[str]:
    """How to SSH in: RunPod's proxy (any image) and, once running, direct TCP on a public IP."""
    commands = []
    host_id = (pod.get("machine") or {}).get("podHostId")
    if host_id:
        commands.append(f"ssh {host_id}@ssh.runpod.io -i ~/.ssh/id_ed25519")
    address = ssh_address(pod)
    if address:
        commands.append(f"ssh root@{address[0]} -p {address[1]} -i ~/.ssh/id_ed25519")
    return commands


def masked_env(env: Any) -> list[str]:
    """A pod's env as KEY=value lines with every secret value hidden (references are shown)."""
    lines = []
    for key, value in pod_env({"env": env}).items():
        hidden = is_secret_name(key) and not is_secret_reference(value)
        secret = hidden or looks_like_literal_token(value)
        lines.append(f"{key}={'<hidden>' if secret else value}")
    return lines


def describe_request(request: PodRequest) -> str:
    """The dry-run text: the GraphQL operation and its variables, exactly as they are sent."""
    lines = [
        f"# POST {_api_base()}/graphql with 'Authorization: Bearer $RUNPOD_API_KEY' (not shown)",
        "# secrets travel only as RunPod secret references, resolved by RunPod inside the pod",
    ]
    if not request.resolved:
        lines.append(
            "# dataCenterId: filled in at create time from the network volume "
            "(set RUNPOD_API_KEY to resolve it and check the GPU types and volume now)"
        )
    if len(request.gpu_types) > 1:
        lines.append(f"# on no capacity, gpuTypeId becomes in turn: {', '.join(request.gpu_types[1:])}")
    price = request.hourly_price()
    if price is not None:
        lines.append(f"# price: about ${price:.2f}/h for this pod")
    body = {"query": request.query, "variables": {"input": request.input}}
    return "\n".join([*lines, json.dumps(body, indent=2)])

"""What `orchestrate pod` asks of RunPod: the manifest as a REST v2 create body, the checks made
before a pod is created (GPU types, volume, price caps, a twin already running), and reading pods.

Why this split: `rest` knows HTTP and RunPod's v2 paths; `spot` is the one legacy GraphQL call
(interruptible pods exist only there); this module knows podtrain: which pod a manifest means,
what it costs, and which of the account's pods are podtrain's (env `PODTRAIN_MANAGED=1`, with an
absolute `RUN_DEADLINE` that boot.sh enforces inside the pod and `pod reap` from outside).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.pods import rest, spot
from orchestrator.pods.manifest import (
    VOLUME_PLACEHOLDER,
    PodManifest,
    is_secret_name,
    is_secret_reference,
    mask,
)
from orchestrator.pods.rest import PodError, has_api_key

__all__ = ["PodError", "has_api_key"]

_POD_ID = re.compile(r"^[A-Za-z0-9_-]+$")
#: Pod states that still hold (or are about to hold) a GPU.
ACTIVE = {"PROVISIONING", "STARTING", "RUNNING"}
_SSH_KEY = "~/.ssh/id_ed25519"


@dataclass(frozen=True)
class PodRequest:
    """Exactly what `create_pod` sends: the createPod body (`gpu.id` is the first GPU type; the
    others are tried in turn when RunPod cannot place it), and what was looked up for it.

    `body["dataCenterIds"]` is absent until resolved from the network volume (the pod must land in
    the volume's data center); `prices` is $/h for the whole pod per GPU type, from the catalog.
    """

    body: dict[str, Any]
    gpu_types: list[str]
    spot: bool
    bid_per_gpu: float | None = None
    prices: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def resolved(self) -> bool:
        return "dataCenterIds" in self.body

    def for_gpu(self, gpu_type: str) -> PodRequest:
        return replace(self, body={**self.body, "gpu": {**self.body["gpu"], "id": gpu_type}})

    @property
    def gpu_type(self) -> str:
        return self.body["gpu"]["id"]

    def hourly_price(self, gpu_type: str | None = None) -> float | None:
        """$/h for the whole pod: the bid for spot, else RunPod's catalog price (None: unknown)."""
        if self.spot and self.bid_per_gpu is not None:
            return self.bid_per_gpu * self.body["gpu"]["count"]
        return self.prices.get(gpu_type or self.gpu_type)


def deadline_for(manifest: PodManifest, now: float) -> int:
    """RUN_DEADLINE: Unix seconds (UTC) at which the pod must be stopped."""
    return int(now + manifest.max_runtime_hours * 3600)


def build_request(manifest: PodManifest, now: float | None = None) -> PodRequest:
    """The createPod body for a manifest, before any lookup (no network, no key)."""
    deadline = deadline_for(manifest, time.time() if now is None else now)
    gpu: dict[str, Any] = {"id": manifest.gpu_types[0], "count": manifest.gpu_count}
    if manifest.cuda_floor:
        gpu["minCudaVersion"] = manifest.cuda_floor
    if manifest.allowed_cuda_versions:
        gpu["allowedCudaVersions"] = list(manifest.allowed_cuda_versions)
    body: dict[str, Any] = {
        "name": manifest.pod_name,
        "image": manifest.image,
        "gpu": gpu,
        "cloud": manifest.cloud_type.upper(),
        "disk": manifest.container_disk_in_gb,
        "ports": list(manifest.ports),
        "env": manifest.pod_env(deadline),
        "mounts": {"network": [{"volumeId": manifest.volume_id,
                                "path": manifest.volume_mounts[0].mount_path}]},
        "startSsh": True,
    }
    if manifest.command:
        body["args"] = manifest.command
    return PodRequest(body=body, gpu_types=manifest.gpu_types, spot=manifest.spot,
                      bid_per_gpu=manifest.bid_per_gpu)


def _checked_id(pod_id: str) -> str:
    if not _POD_ID.match(pod_id):
        raise PodError(f"pod id {pod_id!r}: RunPod pod ids are letters, digits, - and _ only")
    return pod_id


def resolve_request(manifest: PodManifest) -> PodRequest:
    """Check the GPU types (catalog) and the volume; pin the volume's data center; apply the
    price caps. Read-only requests only."""
    request = build_request(manifest)
    prices = {}
    for i, gpu_id in enumerate(request.gpu_types):
        gpu = rest.gpu_type(gpu_id, manifest.gpu_count)
        if gpu is None:
            key = "gpuType" if len(request.gpu_types) == 1 else f"gpuType[{i}]"
            raise PodError(f"{key}: RunPod has no GPU type {gpu_id!r} (ids look like 'NVIDIA A100 "
                           "80GB PCIe', 'NVIDIA H100 80GB HBM3')")
        price = (gpu.get("price") or {}).get(request.body["cloud"].lower())
        if isinstance(price, (int, float)) and price > 0:
            prices[gpu_id] = price * manifest.gpu_count
    if request.spot:
        spot.check_bid(request.gpu_types, manifest.gpu_count, manifest.bid_per_gpu or 0.0)
    volumes = rest.list_volumes()
    volume = next((v for v in volumes if v.get("id") == manifest.volume_id), None)
    if volume is None:
        yours = ", ".join(f"{v.get('id')} ({v.get('name')}, {v.get('dataCenter')})"
                          for v in volumes) or "none"
        raise PodError(f"volumeMounts[0].volumeName: network volume {manifest.volume_id!r} is not "
                       f"in this RunPod account (yours: {yours})")
    body = {**request.body, "dataCenterIds": [volume["dataCenter"]]}
    resolved = replace(request, body=body, prices=prices)
    return within_price_caps(resolved, manifest)


def volume_data_center(manifest: PodManifest) -> str | None:
    """The manifest volume's data center, when a key is at hand and the volume is real (None for
    the shipped placeholder or without a key: nothing is sent then)."""
    if not has_api_key() or manifest.volume_id == VOLUME_PLACEHOLDER:
        return None
    volume = next((v for v in rest.list_volumes() if v.get("id") == manifest.volume_id), None)
    return volume.get("dataCenter") if volume else None


def within_price_caps(request: PodRequest, manifest: PodManifest) -> PodRequest:
    """Only the GPU types whose price fits maxHourlyPrice and maxTotalPrice (over
    maxRuntimeHours); PodError naming every price when none fits."""
    hourly_cap, total_cap = manifest.max_hourly_price, manifest.max_total_price
    if hourly_cap is None and total_cap is None:
        return request
    hours = manifest.max_runtime_hours
    fits, refused = [], []
    for gpu_type in request.gpu_types:
        price = request.hourly_price(gpu_type)
        if price is None:
            refused.append(f"{gpu_type}: no price in RunPod's catalog")
        elif hourly_cap is not None and price > hourly_cap:
            refused.append(f"{gpu_type}: ${price:.2f}/h > maxHourlyPrice ${hourly_cap:.2f}/h")
        elif total_cap is not None and price * hours > total_cap:
            refused.append(f"{gpu_type}: ${price:.2f}/h x {hours:g} h = ${price * hours:.2f} > "
                           f"maxTotalPrice ${total_cap:.2f}")
        else:
            fits.append(gpu_type)
    if not fits:
        raise PodError(f"refused before create: every GPU type costs more than the caps allow "
                       f"({'; '.join(refused)})")
    return replace(request.for_gpu(fits[0]), gpu_types=fits)


def pod_env(pod: dict[str, Any]) -> dict[str, str]:
    """A pod's env as a dict (REST v2 answers an object; GraphQL answered KEY=value strings)."""
    env = pod.get("env") or {}
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items()}
    return dict(str(item).split("=", 1) for item in env if "=" in str(item))


def running_twin(manifest: PodManifest) -> dict[str, Any] | None:
    """A pod that is not stopped and trains the same experiment on the same volume, if any.

    Two such pods would write the same checkpoints and shards on one volume: the later save wins
    and both runs are corrupted.
    """
    for pod in rest.list_pods():
        if pod.get("status") not in ACTIVE:
            continue
        env = pod_env(pod)
        same_volume = env.get("RUN_VOLUME_ID", manifest.volume_id) == manifest.volume_id
        if env.get("RUN_EXPERIMENT") == manifest.experiment and same_volume:
            return pod
    return None


def create_pod(manifest: PodManifest, force: bool = False) -> tuple[dict[str, Any], PodRequest]:
    """Create the pod a manifest describes, trying its GPU types in order; return RunPod's pod
    and the request that succeeded."""
    request = resolve_request(manifest)
    twin = None if force else running_twin(manifest)
    if twin is not None:
        raise PodError(
            f"pod {twin.get('id')} ({twin.get('name')}, {twin.get('status')}) already runs "
            f"experiment {manifest.experiment!r} on volume {manifest.volume_id}: stop it first "
            "(orchestrate pod stop ID), or pass --force"
        )
    failures: list[str] = []
    for gpu_type in request.gpu_types:
        attempt = request.for_gpu(gpu_type)
        try:
            pod = spot.rent(attempt.body, attempt.bid_per_gpu) if attempt.spot else \
                rest.create_pod(attempt.body)
        except PodError as exc:
            if exc.uncertain:
                raise PodError(_maybe_created(exc, attempt.body["name"]), uncertain=True) from None
            if exc.status != 400 or gpu_type == request.gpu_types[-1]:
                also = f" (also not placed: {'; '.join(failures)})" if failures else ""
                raise PodError(f"{exc}{also}", status=exc.status) from None
            failures.append(gpu_type)
            continue
        if not pod.get("id"):
            raise PodError("cannot create the pod: RunPod answered without a pod id")
        return pod, attempt
    raise AssertionError("unreachable: the manifest lists at least one GPU type")


def _maybe_created(exc: PodError, name: str) -> str:
    """The create may have reached RunPod: say so, and name the pod if it already shows."""
    try:
        found = [p for p in rest.list_pods() if p.get("name") == name]
    except PodError:
        found = []
    if found:
        ids = ", ".join(f"{p.get('id')} ({p.get('status')})" for p in found)
        return (f"{exc}; a pod named {name!r} exists now: {ids}. Check it with `orchestrate pod "
                "get ID` before creating again")
    return (f"{exc}; the pod may still have been created: `orchestrate pod list` (look for "
            f"{name!r}) before creating again")


def list_volumes() -> list[dict[str, Any]]:
    return rest.list_volumes()


def list_pods() -> list[dict[str, Any]]:
    return rest.list_pods()


def get_pod(pod_id: str) -> dict[str, Any]:
    try:
        return rest.get_pod(_checked_id(pod_id))
    except PodError as exc:
        if exc.status == 404:
            raise PodError(f"pod {pod_id}: no such pod in this RunPod account "
                           "(orchestrate pod list)", status=404) from None
        raise


def find_pod(name_or_id: str) -> dict[str, Any]:
    """A pod by id, or by name when exactly one pod (preferring pods that run) has it."""
    pods = rest.list_pods()
    matches = [p for p in pods if p.get("id") == name_or_id] or \
              [p for p in pods if p.get("name") == name_or_id]
    if not matches:
        raise PodError(f"{name_or_id!r}: no pod with that id or name in this RunPod account "
                       "(orchestrate pod list)")
    active = [p for p in matches if p.get("status") in ACTIVE]
    if len(active) > 1:
        ids = ", ".join(p.get("id", "?") for p in active)
        raise PodError(f"{name_or_id!r}: several pods run with that name ({ids}); use an id")
    return (active or matches)[0]


def stop_pod(pod_id: str) -> dict[str, Any]:
    """Stop: the GPU is released and billing for it stops; the volume and the pod record stay."""
    return rest.pod_action(_checked_id(pod_id), "stop")


def start_pod(pod_id: str) -> dict[str, Any]:
    return rest.pod_action(_checked_id(pod_id), "start")


def terminate_pod(pod_id: str) -> None:
    """Delete the pod for good (the network volume is untouched)."""
    rest.delete_pod(_checked_id(pod_id))


def tensorboard_url(pod_id: str) -> str:
    """RunPod's HTTP proxy address for port 6006 (no port-forward exists or is needed)."""
    return f"https://{pod_id}-6006.proxy.runpod.net"


def ssh_address(pod: dict[str, Any]) -> tuple[str, int] | None:
    """(public IP, port) of the pod's direct TCP SSH (`ssh.direct`), once it runs."""
    direct = (pod.get("ssh") or {}).get("direct")
    if direct and direct.get("host") and direct.get("port"):
        return str(direct["host"]), int(direct["port"])
    return None


def ssh_commands(pod: dict[str, Any]) -> list[str]:
    """How to SSH in, as RunPod's pod object gives it: the proxy (interactive only, any image)
    and direct TCP, each with the key RunPod's console tells you to add."""
    ssh = pod.get("ssh") or {}
    return [f"{endpoint['command']} -i {_SSH_KEY}" for endpoint in (ssh.get("proxy"),
                                                                     ssh.get("direct"))
            if endpoint and endpoint.get("command")]


def masked_env(env: Any) -> list[str]:
    """A pod's env as KEY=value lines with every secret value hidden (references are shown)."""
    lines = []
    for key, value in pod_env({"env": env}).items():
        hidden = is_secret_name(key) and not is_secret_reference(value)
        lines.append(mask(f"{key}={'<hidden>' if hidden else value}"))
    return lines


def public(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod record safe to print: secret env values hidden, token shapes masked."""
    if "env" in pod:
        pod = {**pod, "env": dict(line.split("=", 1) for line in masked_env(pod["env"]))}
    return json.loads(mask(json.dumps(pod)))


def describe_request(request: PodRequest) -> str:
    """The dry-run text: the request exactly as it is sent (secrets only as references)."""
    if request.spot:
        endpoint = f"POST {rest.base_url()}/graphql (legacy GraphQL podRentInterruptable: spot)"
    else:
        endpoint = f"POST {rest.base_url()}/v2/pods"
    lines = [f"# {endpoint} with 'Authorization: Bearer $RUNPOD_API_KEY' (not shown)",
             "# secrets travel only as RunPod secret references, resolved by RunPod inside the pod"]
    if not request.resolved:
        lines.append("# dataCenterIds: filled in at create time from the network volume "
                     "(set RUNPOD_API_KEY to resolve it and check GPU types, volume and prices now)")
    if len(request.gpu_types) > 1:
        lines.append(f"# if RunPod cannot place it, gpu.id becomes in turn: "
                     f"{', '.join(request.gpu_types[1:])}")
    price = request.hourly_price()
    if price is not None:
        lines.append(f"# price: about ${price:.2f}/h for this pod")
    body = spot.rent_input(request.body, request.bid_per_gpu) if request.spot else request.body
    return mask("\n".join([*lines, json.dumps(body, indent=2)]))

"""Spot (interruptible) pods: legacy, through RunPod's GraphQL API, which REST v2 cannot do yet.

Why it stays: REST v2 has no interruptible pods; GraphQL's `podRentInterruptable` (the on-demand
input plus `bidPerGpu`) does. RunPod retires GraphQL in early 2027, so this is the one legacy call,
kept small. Values travel as GraphQL variables, never pasted into the query text (a quote or a
newline in a start command cannot break or rewrite it). A bid under the GPU's current minimum
(`lowestPrice.minimumBidPrice`, as runpod-python's `get_gpu` reads it) is refused before sending.
"""

from __future__ import annotations

from typing import Any

from orchestrator.pods import rest
from orchestrator.pods.rest import PodError

_GPU_QUERY = ("query gpu($input: GpuTypeFilter, $count: Int) { gpuTypes(input: $input) "
              "{ id lowestPrice(input: {gpuCount: $count}) { minimumBidPrice } } }")
_RENT = ("mutation rent($input: PodRentInterruptableInput!) "
         "{ podRentInterruptable(input: $input) { id name desiredStatus costPerHr } }")


def _graphql(action: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    """One GraphQL operation; its `errors` become a PodError (status 400: "not placed")."""
    response = rest.call(action, "POST", "/graphql", body={"query": query, "variables": variables},
                         retry=False)
    answer = rest.json_of(action, response)
    if answer.get("errors"):
        message = rest.redact(answer["errors"][0].get("message", "error"))
        raise PodError(f"cannot {action}: RunPod answered: {message}", status=400)
    return answer.get("data") or {}


def check_bid(gpu_types: list[str], count: int, bid: float) -> None:
    """PodError unless `bid` ($/h per GPU) reaches every GPU type's current minimum bid."""
    for gpu_id in gpu_types:
        data = _graphql(f"look up the minimum spot bid for {gpu_id}", _GPU_QUERY,
                        {"input": {"id": gpu_id}, "count": count})
        gpus = data.get("gpuTypes") or []
        lowest = (gpus[0].get("lowestPrice") or {}) if gpus else {}
        minimum = lowest.get("minimumBidPrice")
        if isinstance(minimum, (int, float)) and bid < minimum:
            raise PodError(f"bidPerGpu: ${bid:.3f}/h is under RunPod's minimum spot bid for "
                           f"{gpu_id} (${minimum:.3f}/h now): raise it")


def rent_input(body: dict[str, Any], bid: float | None) -> dict[str, Any]:
    """The REST v2 create body as GraphQL's PodRentInterruptableInput."""
    gpu, mount = body["gpu"], body["mounts"]["network"][0]
    inp: dict[str, Any] = {
        "name": body["name"], "imageName": body["image"], "gpuTypeId": gpu["id"],
        "gpuCount": gpu["count"], "cloudType": body["cloud"], "containerDiskInGb": body["disk"],
        "volumeInGb": 0, "ports": ",".join(body["ports"]), "startSsh": body["startSsh"],
        "networkVolumeId": mount["volumeId"], "volumeMountPath": mount["path"],
        "env": [{"key": k, "value": v} for k, v in body["env"].items()], "bidPerGpu": bid,
    }
    if "args" in body:
        inp["dockerArgs"] = body["args"]
    if gpu.get("minCudaVersion"):
        inp["minCudaVersion"] = gpu["minCudaVersion"]
    if gpu.get("allowedCudaVersions"):
        inp["allowedCudaVersions"] = gpu["allowedCudaVersions"]
    if body.get("dataCenterIds"):
        inp["dataCenterId"] = body["dataCenterIds"][0]
    return inp


def rent(body: dict[str, Any], bid: float | None) -> dict[str, Any]:
    """Rent the spot pod; its answer is shaped like a REST v2 pod for the callers."""
    data = _graphql(f"rent a spot pod on {body['gpu']['id']}", _RENT,
                    {"input": rent_input(body, bid)})
    pod = data.get("podRentInterruptable") or {}
    return {"id": pod.get("id"), "name": pod.get("name"), "status": pod.get("desiredStatus"),
            "cost": pod.get("costPerHr")}

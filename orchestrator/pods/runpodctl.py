"""The `runpodctl pod create --...` line equivalent to a manifest, and what it cannot express.

Why: runpodctl has no `-f` (the seed's `runpodctl create pod -f` never existed), so users who
prefer RunPod's own tool need the flags spelled out. The flags are runpodctl's as its source has
them (runpod/runpodctl, cmd/pod/create.go at 2e2df89: --name, --image, --gpu-id, --gpu-count,
--cloud-type, --container-disk-in-gb, --network-volume-id, --volume-mount-path, --ports,
--data-center-ids, --min-cuda-version, --docker-args, --env as a JSON object; --ssh defaults to
true).
"""

from __future__ import annotations

import json
import shlex

from orchestrator.pods.manifest import PodManifest, mask


def runpodctl_line(manifest: PodManifest, data_center: str | None) -> tuple[str, list[str]]:
    """(the command line, one line per manifest setting it cannot express); `data_center` is the
    volume's, when it could be looked up."""
    env = {k: v for k, v in manifest.pod_env(deadline=0).items() if k != "RUN_DEADLINE"}
    argv = [
        "runpodctl", "pod", "create",
        "--name", manifest.pod_name,
        "--image", manifest.image,
        "--gpu-id", manifest.gpu_types[0],
        "--gpu-count", str(manifest.gpu_count),
        "--cloud-type", manifest.cloud_type.upper(),
        "--container-disk-in-gb", str(manifest.container_disk_in_gb),
        "--network-volume-id", manifest.volume_id,
        "--volume-mount-path", manifest.volume_mounts[0].mount_path,
        "--ports", ",".join(manifest.ports),
    ]
    if data_center:
        argv += ["--data-center-ids", data_center]
    if manifest.cuda_floor:
        argv += ["--min-cuda-version", manifest.cuda_floor]
    argv += ["--env", json.dumps(env, separators=(",", ":"))]
    if manifest.command:
        argv += ["--docker-args", manifest.command]
    lost = [
        "maxRuntimeHours: RUN_DEADLINE is computed when `orchestrate pod create` runs; add "
        f"\"RUN_DEADLINE\":\"<the output of: date -d +{manifest.max_runtime_hours:g}hours +%s>\" "
        "to --env yourself, or boot.sh arms no deadline stop",
    ]
    if not data_center:
        lost.append("dataCenterIds: `orchestrate pod create` pins the volume's data center; add "
                    "--data-center-ids <its id> (orchestrate volume list) to do the same")
    if len(manifest.gpu_types) > 1:
        lost.append(f"gpuType: runpodctl takes one --gpu-id; {', '.join(manifest.gpu_types[1:])} "
                    "are not tried when RunPod cannot place the first")
    if manifest.spot:
        lost.append("spot, bidPerGpu: `runpodctl pod create` makes on-demand pods only")
    if manifest.allowed_cuda_versions:
        lost.append("allowedCudaVersions: runpodctl has only --min-cuda-version")
    for key, value in (("maxHourlyPrice", manifest.max_hourly_price),
                       ("maxTotalPrice", manifest.max_total_price)):
        if value is not None:
            lost.append(f"{key}: runpodctl checks no price")
    lost.append("a second pod for the same experiment on the same volume is not refused")
    return mask(shlex.join(argv)), lost

"""Reading a running pod's files over SSH: the fallback for its boot log, and the trainer's metrics.

Why SSH: RunPod's REST v2 serves the container's output (`orchestrate pod logs`), but not files on
the volume such as runs/<experiment>/checkpoints/metrics.jsonl. Every pod with `22/tcp` exposed
runs sshd (the image's /start.sh, which boot.sh starts) on a public IP: the pod object's
`ssh.direct`. Only direct TCP SSH runs remote commands; RunPod's ssh.runpod.io proxy is
interactive only.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

from orchestrator.pods.api import PodError, pod_env, ssh_address
from orchestrator.pods.manifest import WORKSPACE

_SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"]


def run_dir(pod: dict[str, Any]) -> str:
    experiment = pod_env(pod).get("RUN_EXPERIMENT", "runpod-1b")
    return f"{WORKSPACE}/runs/{experiment}"


def ssh_argv(pod: dict[str, Any], command: str) -> list[str]:
    """The ssh command line that runs `command` on the pod; PodError when it has no direct SSH."""
    address = ssh_address(pod)
    if address is None:
        raise PodError(
            f"pod {pod.get('id')}: no direct SSH yet (it is {pod.get('desiredStatus') or 'starting'}"
            "; it needs ports 22/tcp and a public IP): try again once it runs"
        )
    ip, port = address
    return ["ssh", "-p", str(port), *_SSH_OPTIONS, f"root@{ip}", command]


def boot_log_command(pod: dict[str, Any], lines: int, follow: bool) -> list[str]:
    """`tail` of runs/<experiment>/boot.log on the pod (-F follows it across boots)."""
    path = shlex.quote(f"{run_dir(pod)}/boot.log")
    return ssh_argv(pod, f"tail -n {lines} {'-F ' if follow else ''}{path}")


def last_logged_step(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's newest row with a loss in runs/<experiment>/checkpoints/metrics.jsonl, or
    None when SSH or the file is not there (status still shows the rest)."""
    path = shlex.quote(f"{run_dir(pod)}/checkpoints/metrics.jsonl")
    try:
        done = subprocess.run(ssh_argv(pod, f"tail -n 50 {path}"), capture_output=True,
                              text=True, timeout=60, check=False)
    except (PodError, OSError, subprocess.TimeoutExpired):
        return None
    rows = []
    for line in done.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row and "step" in row:
            rows.append(row)
    return rows[-1] if rows else None

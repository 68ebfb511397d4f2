"""`orchestrate pod reap`: the user-side half of the runtime cap.

Why: RunPod enforces no runtime cap (GraphQL's stopAfter/terminateAfter are accepted and ignored;
REST v2 has no such field). boot.sh stops its own pod at RUN_DEADLINE; a pod whose container never
started, or whose stop failed, needs someone outside. The reaper reads each pod's env from the
REST v2 pod object: only pods with `PODTRAIN_MANAGED=1` are podtrain's, and `RUN_DEADLINE` (Unix
seconds, UTC) is when they must stop.

Idle (opt-in, `--idle-minutes M`): a RUNNING podtrain pod up for at least M minutes (`createdAt`)
whose container is not up (`runtime` is null: image pull, crash loop, no host for its CUDA), or
whose every GPU reports 0% utilization and 0% memory use in `runtime.gpus`. That is one snapshot:
the shard and tokenizer stages use no GPU for hours, so pick M above their length or leave it off.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from orchestrator.pods import api as pods
from orchestrator.pods.rest import PodError


def _created(pod: dict[str, Any]) -> float | None:
    stamp = pod.get("startedAt") or pod.get("createdAt")
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def idle_reason(pod: dict[str, Any], now: float, idle_minutes: float) -> str | None:
    """Why a running pod counts as idle, or None."""
    created = _created(pod)
    if pod.get("status") != "RUNNING" or created is None or now - created < idle_minutes * 60:
        return None
    runtime = pod.get("runtime")
    if not runtime:
        return f"its container is not up {idle_minutes:g} min after start"
    gpus = runtime.get("gpus") or []
    if gpus and all(not g.get("util") and not g.get("memoryUtil") for g in gpus):
        return "its GPUs show 0% use and no memory"
    return None


def reap_reason(pod: dict[str, Any], now: float, terminate: bool,
                idle_minutes: float | None) -> str | None:
    """Why this pod is reaped now, or None (not podtrain's, not due, already stopped)."""
    env = pods.pod_env(pod)
    if env.get("PODTRAIN_MANAGED") != "1" or pod.get("status") == "TERMINATED":
        return None
    running = pod.get("status") in pods.ACTIVE
    if not running and not terminate:
        return None
    deadline = env.get("RUN_DEADLINE", "")
    if deadline.isdigit() and now >= int(deadline):
        when = datetime.fromtimestamp(int(deadline), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"past its deadline {when}"
    if idle_minutes is not None:
        return idle_reason(pod, now, idle_minutes)
    return None


def reap_pods(now: float, terminate: bool, idle_minutes: float | None,
              dry_run: bool) -> list[str]:
    """Stop (or delete) every due podtrain pod; one line per pod. A failure on one pod is
    reported and the others are still reaped; PodError at the end if any failed."""
    lines, failed = [], []
    for pod in pods.list_pods():
        reason = reap_reason(pod, now, terminate, idle_minutes)
        if reason is None:
            continue
        verb = "delete" if terminate else "stop"
        label = f"pod {pod.get('id')} '{pod.get('name')}' ({pod.get('status')}, {reason})"
        if dry_run:
            lines.append(f"would {verb} {label}")
            continue
        try:
            pods.terminate_pod(pod["id"]) if terminate else pods.stop_pod(pod["id"])
        except PodError as exc:
            failed.append(f"{label}: {exc}")
            continue
        lines.append(f"{'deleted' if terminate else 'stopped'} {label}")
    if failed:
        raise PodError("; ".join([*lines, *(f"could not reap {f}" for f in failed)]))
    return lines

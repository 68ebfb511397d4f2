"""RunPod's REST API v2 over plain HTTP: the only module that sends REST requests to RunPod.

Why plain HTTP and not the `runpod` SDK: the SDK speaks GraphQL, which RunPod retires in early
2027, and builds queries by pasting strings. REST v2 (`https://api.runpod.io/v2/...`, contract in
runpod/docs `api-reference-v2/openapi.json`, vendored as tests/data/runpod_openapi_v2.json) takes
JSON bodies, rejects unknown keys with 422 and answers errors as `{title, status, detail, errors}`.

Every call: a timeout, retries with backoff on 429 (honouring `Retry-After`), 5xx and connection
errors for idempotent requests, and failures as one line naming the call, the HTTP status and the
API's own message. `RUNPOD_API_BASE_URL` points it elsewhere (tests: a fake on 127.0.0.1). The key
comes from `RUNPOD_API_KEY` and is never printed: any echo of it in an answer is blanked.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import requests
import urllib3

DEFAULT_BASE_URL = "https://api.runpod.io"
#: Seconds to wait for a connection and for each read (log streams read with their own idle limit).
TIMEOUT_S = (10, 60)
#: Attempts for a request that may be repeated safely, and the first backoff (doubling).
ATTEMPTS = 4
BACKOFF_S = 0.5


class PodError(RuntimeError):
    """A RunPod request that failed, as one line fit for a terminal (never carries the API key).

    `status` is the HTTP status (None: no answer); `uncertain` marks a create whose outcome is
    unknown (timeout or 5xx after the request was sent): a pod may exist.
    """

    def __init__(self, message: str, status: int | None = None, uncertain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.uncertain = uncertain


def base_url() -> str:
    return os.environ.get("RUNPOD_API_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def api_key() -> str:
    key = os.environ.get("RUNPOD_API_KEY", "").strip()
    if not key:
        raise PodError(
            "RUNPOD_API_KEY is not set: create a key in the RunPod console (Settings > API Keys) "
            "and export RUNPOD_API_KEY=... (it is never printed)"
        )
    return key


def has_api_key() -> bool:
    return bool(os.environ.get("RUNPOD_API_KEY", "").strip())


def redact(text: str) -> str:
    """One line, with the API key blanked should a server ever echo it."""
    line = " ".join(str(text).split())
    key = os.environ.get("RUNPOD_API_KEY", "").strip()
    return line.replace(key, "***") if key else line


def _problem(response: requests.Response) -> str:
    """The API's own words for a failure: `detail` and each entry of `errors` (422)."""
    try:
        body = response.json()
    except ValueError:
        return redact(response.text[:300]) or response.reason or ""
    if not isinstance(body, dict):
        return redact(str(body)[:300])
    parts = [str(body.get("detail") or body.get("title") or body.get("error") or "")]
    parts += [str(e) for e in body.get("errors") or []]
    return redact("; ".join(p for p in parts if p))


def _hint(status: int) -> str:
    return {401: " (check RUNPOD_API_KEY: console > Settings > API Keys)",
            402: " (insufficient balance: add funds in the console)",
            403: " (the API key lacks access: a read-only key cannot create or stop pods)"}.get(
        status, "")


def call(action: str, method: str, path: str, *, body: dict[str, Any] | None = None,
         params: dict[str, Any] | None = None, retry: bool | None = None,
         headers: dict[str, str] | None = None, read_timeout_s: float | None = None,
         stream: bool = False) -> requests.Response:
    """One request to `path` (under the base URL), checked; PodError on any failure.

    `retry` defaults to "the method is idempotent"; a POST that creates is never resent after it
    may have reached RunPod (a timeout or 5xx then raises an `uncertain` PodError).
    """
    retry = method in ("GET", "DELETE") or path.endswith("/action") if retry is None else retry
    headers = {"Authorization": f"Bearer {api_key()}", "Accept": "application/json",
               **(headers or {})}
    timeout = (TIMEOUT_S[0], read_timeout_s or TIMEOUT_S[1])
    url = f"{base_url()}{path}"
    for attempt in range(ATTEMPTS):
        last = attempt == ATTEMPTS - 1
        try:
            response = requests.request(method, url, headers=headers, json=body, params=params,
                                        timeout=timeout, stream=stream)
        except (requests.ConnectionError, requests.Timeout) as exc:
            sent = _maybe_sent(exc)
            if last or (sent and not retry):
                raise PodError(f"cannot {action}: no answer from the RunPod API at {base_url()} "
                               f"({type(exc).__name__})", uncertain=sent and not retry) from None
        else:
            status = response.status_code
            if status < 400:
                return response
            transient = status == 429 or (status >= 500 and retry)
            if last or not transient:
                raise PodError(f"cannot {action}: RunPod answered HTTP {status}: "
                               f"{_problem(response)}{_hint(status)}", status=status,
                               uncertain=status >= 500 and not retry) from None
            wait = response.headers.get("Retry-After", "")
            if wait.isdigit():
                time.sleep(min(int(wait), 60))
                continue
        time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _maybe_sent(exc: requests.RequestException) -> bool:
    """Whether the request may have reached RunPod: not when no connection was ever made."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return not isinstance(reason, urllib3.exceptions.NewConnectionError)


def json_of(action: str, response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise PodError(f"cannot {action}: RunPod answered HTTP {response.status_code} without "
                       "JSON") from None


# -- pods -------------------------------------------------------------------------------------


def create_pod(body: dict[str, Any]) -> dict[str, Any]:
    """POST /v2/pods (createPod): one GPU type, one try; 400 means "not placed" or a rule."""
    gpu = (body.get("gpu") or {}).get("id", "?")
    action = f"create the pod on {gpu}"
    return json_of(action, call(action, "POST", "/v2/pods", body=body))


def list_pods() -> list[dict[str, Any]]:
    return json_of("list pods", call("list pods", "GET", "/v2/pods")).get("pods") or []


def get_pod(pod_id: str) -> dict[str, Any]:
    return json_of(f"get pod {pod_id}", call(f"get pod {pod_id}", "GET", f"/v2/pods/{pod_id}"))


def pod_action(pod_id: str, action: str) -> dict[str, Any]:
    """POST /v2/pods/{id}/action: start, stop, restart (terminate is `delete_pod`)."""
    response = call(f"{action} pod {pod_id}", "POST", f"/v2/pods/{pod_id}/action",
                    body={"action": action})
    return json_of(f"{action} pod {pod_id}", response) if response.content else {}


def delete_pod(pod_id: str) -> None:
    call(f"delete pod {pod_id}", "DELETE", f"/v2/pods/{pod_id}")


def pod_logs(pod_id: str, tail: int | None, since: str | None, last_event_id: str | None,
             idle_s: float) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """GET /v2/pods/{id}/logs: (event id, {ts, source, line}) per server-sent event.

    The stream ends when the server closes it or when no byte came for `idle_s` seconds (the
    read timeout applies to each read of a streamed answer). `last_event_id` resumes after a drop.
    """
    params: dict[str, Any] = {}
    if tail is not None:
        params["tail"] = tail
    if since:
        params["since"] = since
    action = f"read the logs of pod {pod_id}"
    response = call(action, "GET", f"/v2/pods/{pod_id}/logs", params=params, stream=True,
                    headers={"Accept": "text/event-stream",
                             **({"Last-Event-ID": last_event_id} if last_event_id else {})},
                    read_timeout_s=idle_s)
    event_id, data = None, []
    try:
        for raw in response.iter_lines(decode_unicode=True):
            if raw == "":
                if data:
                    yield event_id, _payload("\n".join(data))
                data = []
                continue
            name, _, value = raw.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        pass  # a stream that went quiet or dropped ends here; the caller may resume
    finally:
        response.close()
    if data:
        yield event_id, _payload("\n".join(data))


def _payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"line": text}
    return value if isinstance(value, dict) else {"line": str(value)}


# -- network volumes and the catalog ------------------------------------------------------------


def list_volumes() -> list[dict[str, Any]]:
    answer = json_of("list your network volumes",
                     call("list your network volumes", "GET", "/v2/network-volumes"))
    return answer.get("networkVolumes") or []


def create_volume(name: str, size_gb: int, data_center: str) -> dict[str, Any]:
    action = f"create network volume {name!r}"
    body = {"name": name, "size": size_gb, "dataCenter": data_center}
    return json_of(action, call(action, "POST", "/v2/network-volumes", body=body))


def gpu_type(gpu_id: str, count: int) -> dict[str, Any] | None:
    """GET /v2/catalog/gpus/{id}: prices per GPU by cloud, or None when RunPod has no such id."""
    action = f"look up GPU type {gpu_id!r}"
    try:
        response = call(action, "GET", f"/v2/catalog/gpus/{requests.utils.quote(gpu_id, safe='')}",
                        params={"count": count})
    except PodError as exc:
        if exc.status == 404:
            return None
        raise
    return json_of(action, response)


def data_center(dc_id: str) -> dict[str, Any] | None:
    """GET /v2/catalog/datacenters/{id} with GPU availability, or None when there is no such id."""
    action = f"look up data center {dc_id!r}"
    try:
        response = call(action, "GET", f"/v2/catalog/datacenters/{requests.utils.quote(dc_id)}",
                        params={"include": "GPU_AVAILABILITY"})
    except PodError as exc:
        if exc.status == 404:
            return None
        raise
    return json_of(action, response)

"""A fake RunPod API on 127.0.0.1 that enforces RunPod's published REST v2 contract.

Why generic: the fake is driven by RunPod's own OpenAPI file (tests/data/runpod_openapi_v2.json,
from runpod/docs; see tests/data/README.md), not by a memory of it. Every request is routed by the
file's paths and methods, its query parameters checked against the declared parameters, and its
JSON body validated with jsonschema against the operation's request schema (required fields,
types, enums, patterns, and 422 on unknown keys: the file's `additionalProperties: false` /
`unevaluatedProperties: false`). Errors come back as the file's ErrorResponse
(`{title, status, detail, errors}`). Every answer the fake gives is validated against the
operation's response schema too, so the pods it hands out have the real shape.

What the contract does not say is marked as the fake's own choice: the wording of a "not placed"
400, and the legacy GraphQL spot calls (`/graphql`: `gpuTypes` with `lowestPrice`, and
`podRentInterruptable`), which are checked to carry every value as a variable.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parent / "data" / "runpod_openapi_v2.json"
SPEC = json.loads(SPEC_PATH.read_text())
_REGISTRY = Registry().with_resource("urn:runpod-openapi",
                                     Resource.from_contents(SPEC, default_specification=DRAFT202012))
#: The fake's own words for a create RunPod cannot place (the contract gives only "400").
NOT_PLACED = "There are no longer any instances available with the requested specifications."
#: Fields of GraphQL's PodRentInterruptableInput podtrain may send (runpodctl's
#: CreatePodGQLInput, internal/api/graphql.go, plus bidPerGpu and allowedCudaVersions).
RENT_FIELDS = frozenset({
    "cloudType", "containerDiskInGb", "dataCenterId", "env", "gpuCount", "gpuTypeId", "imageName",
    "name", "ports", "startSsh", "supportPublicIp", "templateId", "volumeInGb", "volumeMountPath",
    "networkVolumeId", "minCudaVersion", "dockerArgs", "containerRegistryAuthId", "countryCode",
    "allowedCudaVersions", "bidPerGpu",
})


def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"urn:runpod-openapi#{ref}"}, registry=_REGISTRY)


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (#/components/...) in the spec."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _inline(node: Any) -> Any:
    """A (small, acyclic) schema with its local `$ref`s replaced by what they point at."""
    if isinstance(node, dict):
        return {k: _inline(v) for k, v in _resolve(node).items()}
    if isinstance(node, list):
        return [_inline(v) for v in node]
    return node


@dataclass
class Operation:
    """One (method, path) of the contract: its id, parameters and body/response schemas."""

    method: str
    template: str
    operation_id: str
    pattern: re.Pattern[str]
    parameters: dict[str, dict[str, Any]]
    body_ref: str | None
    responses: dict[str, Any]


def _operations() -> list[Operation]:
    out = []
    for template, item in SPEC["paths"].items():
        shared = [_resolve(p) for p in item.get("parameters", [])]
        regex = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        for method, op in item.items():
            if method == "parameters":
                continue
            params = {p["name"]: p for p in shared + [_resolve(p) for p in op.get("parameters", [])]}
            content = (op.get("requestBody") or {}).get("content", {}).get("application/json")
            body_ref = content["schema"]["$ref"].removeprefix("#") if content else None
            out.append(Operation(method.upper(), template, op["operationId"], re.compile(regex),
                                 params, body_ref, op["responses"]))
    return out


OPERATIONS = _operations()


class Problem(Exception):
    """An error answer, as the contract's ErrorResponse."""

    def __init__(self, status: int, detail: str, errors: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors or []

    def body(self) -> dict[str, Any]:
        titles = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                  422: "Unprocessable Entity", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable"}
        out: dict[str, Any] = {"title": titles.get(self.status, "Error"), "status": self.status,
                               "detail": self.detail}
        if self.errors:
            out["errors"] = self.errors
        return out


@dataclass
class Request:
    """One recorded request: operation id, path parameters, query, JSON body, Authorization."""

    method: str
    path: str
    authorization: str
    operation: str = ""
    path_params: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def input(self) -> dict[str, Any]:
        """The body's fields plus the path's (`id`), or a GraphQL call's `input` variable."""
        if isinstance(self.body, dict) and "variables" in self.body:
            return (self.body.get("variables") or {}).get("input") or {}
        return {**self.path_params, **(self.body if isinstance(self.body, dict) else {})}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


GPU_TYPES = {
    "NVIDIA A100 80GB PCIe": {"name": "A100 PCIe", "pool": "AMPERE_80", "memory": 80,
                              "price": {"secure": 1.64, "community": 1.19}, "minBid": 0.6},
    "NVIDIA A100-SXM4-80GB": {"name": "A100 SXM", "pool": "AMPERE_80", "memory": 80,
                              "price": {"secure": 1.89, "community": 1.39}, "minBid": 0.7},
    "NVIDIA H100 80GB HBM3": {"name": "H100 SXM", "pool": "HOPPER_141", "memory": 80,
                              "price": {"secure": 2.99, "community": 2.69}, "minBid": 1.2},
}


class FakeRunPod:
    """The fake API: `with FakeRunPod(api_key) as api:` serves on `api.url` until the block ends."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Request] = []
        self.pods: dict[str, dict[str, Any]] = {}
        self.volumes = [{"id": "vol9test42", "name": "transformer-shared", "size": 1000,
                         "dataCenter": "EU-RO-1", "type": "STANDARD"}]
        #: GPU stock per data center (the catalog's availability levels).
        self.stock = {"EU-RO-1": {gpu: "HIGH" for gpu in GPU_TYPES},
                      "US-KS-2": {"NVIDIA H100 80GB HBM3": "LOW"}}
        self.full_gpu_types: set[str] = set()  # GPU types RunPod cannot place now
        self.fail_next: list[int] = []  # statuses to answer before serving normally (429, 5xx)
        self.create_delay_s = 0.0  # a create answered this late (the pod exists meanwhile)
        self.logs: dict[str, list[dict[str, str]]] = {}  # pod id -> [{ts, source, line}]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeRunPod:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def operations(self) -> list[str]:
        return [r.operation for r in self.requests]

    def find(self, operation: str) -> list[Request]:
        return [r for r in self.requests if r.operation == operation]

    def add_pod(self, uptime: int = 0, cost: float = 1.64, **overrides: Any) -> dict[str, Any]:
        """Seed a running pod, as if created earlier (and up for `uptime` seconds)."""
        body = {"name": "seeded", "image": "runpod/pytorch:test",
                "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 1}, "ports": ["6006/http", "22/tcp"],
                "env": {}}
        body.update({k: v for k, v in overrides.items() if k in ("name", "image", "env", "gpu")})
        pod = self._new_pod(body)
        pod.update({k: v for k, v in overrides.items() if k not in body})
        pod["cost"] = cost
        if pod["runtime"] is not None:
            pod["runtime"]["uptime"] = uptime
        return pod

    # -- HTTP ------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, answer, stream = fake._answer(self.command, self.path, dict(self.headers),
                                                      raw)
                if stream is not None:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(stream.encode())
                    self.close_connection = True
                    return
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                if answer is not None:
                    kind = "application/problem+json" if status >= 400 else "application/json"
                    self.send_header("Content-Type", kind)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:
                    pass  # the client gave up (a timeout): nothing to answer, as at a real server

            do_GET = do_POST = do_PATCH = do_DELETE = _serve  # noqa: N815 (http.server's naming)

        return Handler

    def _answer(self, method: str, target: str, headers: dict[str, str],
                raw: bytes) -> tuple[int, Any, str | None]:
        url = urlsplit(target)
        request = Request(method=method, path=url.path, headers=headers,
                          authorization=headers.get("Authorization", ""),
                          params=dict(parse_qsl(url.query, keep_blank_values=True)))
        try:
            request.body = json.loads(raw) if raw else None
        except ValueError:
            request.body = raw.decode(errors="replace")
        if method == "POST" and url.path == "/graphql":
            request.operation = "graphql"
        with self._lock:
            self.requests.append(request)
            try:
                if request.authorization != f"Bearer {self.api_key}":
                    raise Problem(401, "invalid bearer token")
                if self.fail_next:
                    status = self.fail_next.pop(0)
                    raise Problem(status, "the fake answers as told: a transient failure")
                if request.operation == "graphql":
                    return 200, self._graphql(request), None
                op = self._route(request)
                self._check(op, request, raw)
                status, answer, stream = self._serve(op, request)
            except Problem as problem:
                return problem.status, problem.body(), None
        if answer is not None:
            errors = self._off_contract(op, status, answer)
            if errors:  # a bug in the fake: fail the test loudly, never hand out a wrong shape
                return 500, Problem(500, f"the fake answered {op.operation_id} off-contract",
                                    errors[:5]).body(), None
        if self.create_delay_s and request.operation == "createPod":
            time.sleep(self.create_delay_s)  # created, but the answer is late: a client timeout
        return status, answer, stream

    def _route(self, request: Request) -> Operation:
        allowed = []
        for op in OPERATIONS:
            match = op.pattern.match(request.path)
            if match:
                allowed.append(op.method)
                if op.method == request.method:
                    request.operation = op.operation_id
                    request.path_params = {k: unquote(v) for k, v in match.groupdict().items()}
                    return op
        if allowed:
            raise Problem(405, f"method {request.method} not allowed (allowed: {', '.join(allowed)})")
        raise Problem(404, f"no route {request.path}")

    def _check(self, op: Operation, request: Request, raw: bytes) -> None:
        """Query parameters as declared, and the body against the operation's schema."""
        errors = []
        for name, value in request.params.items():
            param = op.parameters.get(name)
            if param is None or param["in"] != "query":
                errors.append(f"query parameter {name!r} is not allowed")
                continue
            schema = _inline(param["schema"])
            typed: Any = value
            if schema.get("type") == "integer":
                typed = int(value) if re.fullmatch(r"-?\d+", value) else value
            elif schema.get("type") == "boolean":
                typed = {"true": True, "false": False}.get(value, value)
            elif schema.get("type") == "array":
                typed = value.split(",")
            found = [e.message for e in Draft202012Validator(schema).iter_errors(typed)]
            errors += [f"query parameter {name!r}: {m}" for m in found]
        if op.body_ref is None:
            if raw:
                errors.append("this operation takes no body")
        elif not isinstance(request.body, (dict, list)) and raw:
            raise Problem(400, "request body is not valid JSON")
        elif request.body is None:
            errors.append("request body is required")
        else:
            for error in _validator(op.body_ref).iter_errors(request.body):
                where = "/".join(str(p) for p in error.absolute_path) or "(body)"
                errors.append(f"{where}: {error.message}")
        if errors:
            raise Problem(422, "Request validation failed.", sorted(errors))

    def _off_contract(self, op: Operation, status: int, answer: Any) -> list[str]:
        """Where the fake's own answer leaves the operation's response schema (none: [])."""
        response = _resolve(op.responses.get(str(status)) or op.responses["default"])
        content = response.get("content", {})
        schema = (content.get("application/json") or content.get("application/problem+json") or
                  {}).get("schema")
        if not schema:
            return []
        return [e.message for e in _validator(schema["$ref"].removeprefix("#")).iter_errors(answer)]

    # -- operations ------------------------------------------------------------------------------

    def _serve(self, op: Operation, request: Request) -> tuple[int, Any, str | None]:
        name, body, pod_id = op.operation_id, request.body, request.path_params.get("id")
        if name == "listPods":
            return 200, {"pods": list(self.pods.values())}, None
        if name == "createPod":
            return 201, self._create(body), None
        if name == "getPod":
            return 200, self._pod(pod_id), None
        if name == "deletePod":
            self._pod(pod_id)
            del self.pods[pod_id]
            return 204, None, None
        if name == "podAction":
            return self._action(self._pod(pod_id), body["action"])
        if name == "getPodLogs":
            self._pod(pod_id)
            return 200, None, self._log_stream(pod_id, request)
        if name == "listNetworkVolumes":
            return 200, {"networkVolumes": self.volumes}, None
        if name == "createNetworkVolume":
            volume = {"id": f"vol{len(self.volumes) + 1}fake", "name": body["name"],
                      "size": body["size"], "dataCenter": body["dataCenter"],
                      "type": body.get("type", "STANDARD")}
            self.volumes.append(volume)
            return 201, volume, None
        if name == "getGpuType":
            gpu_id = request.path_params["id"]
            if gpu_id not in GPU_TYPES:
                raise Problem(404, f"GPU type {gpu_id} not found")
            return 200, self._gpu(gpu_id), None
        if name == "listGpuTypes":
            return 200, {"gpus": [self._gpu(g) for g in GPU_TYPES]}, None
        if name == "getDataCenter":
            dc = self._data_center(request.path_params["id"])
            if dc is None:
                raise Problem(404, f"data center {request.path_params['id']} not found")
            return 200, dc, None
        if name == "listDataCenters":
            return 200, {"dataCenters": [self._data_center(dc) for dc in self.stock]}, None
        raise Problem(501, f"the fake does not serve {name}")

    def _gpu(self, gpu_id: str) -> dict[str, Any]:
        info = GPU_TYPES[gpu_id]
        return {"id": gpu_id, "name": info["name"], "pool": info["pool"], "manufacturer": "NVIDIA",
                "memory": info["memory"], "secure": True, "community": True,
                "price": dict(info["price"]), "maxCount": {"secure": 8, "community": 8}}

    def _data_center(self, dc_id: str) -> dict[str, Any] | None:
        if dc_id not in self.stock:
            return None
        return {"id": dc_id, "name": dc_id, "region": "EUROPE", "globalNetwork": False,
                "networkVolumeTypes": ["STANDARD"], "compliance": [],
                "gpuAvailability": [{"id": g, "name": GPU_TYPES[g]["name"], "availability": level}
                                    for g, level in self.stock[dc_id].items()]}

    def _pod(self, pod_id: str | None) -> dict[str, Any]:
        if pod_id not in self.pods:
            raise Problem(404, "resource not found")
        return self.pods[pod_id]

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        gpu = body["gpu"]["id"]
        if gpu not in GPU_TYPES:
            raise Problem(400, f"unknown GPU type {gpu}")
        if gpu in self.full_gpu_types:
            raise Problem(400, NOT_PLACED)
        for mount in (body.get("mounts") or {}).get("network", []):
            volume = next((v for v in self.volumes if v["id"] == mount["volumeId"]), None)
            if volume is None:
                raise Problem(400, f"network volume {mount['volumeId']} not found")
            if body.get("cloud") == "COMMUNITY":
                raise Problem(400, "network volumes are available on SECURE cloud only")
            if volume["dataCenter"] not in body.get("dataCenterIds", [volume["dataCenter"]]):
                raise Problem(400, "the network volume is in another data center")
        return self._new_pod(body)

    def _new_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        pod_id = f"pod{len(self.pods) + 1:03d}fake{int(time.time()) % 1000:03d}"
        mounts = body.get("mounts") or {}
        dc = body.get("dataCenterIds", ["EU-RO-1"])[0]
        pod = {
            "id": pod_id, "name": body["name"], "image": body.get("image", ""),
            "args": body.get("args", ""), "disk": body.get("disk", 50),
            "ports": body.get("ports", []), "env": dict(body.get("env") or {}), "registry": None,
            "status": "RUNNING", "actions": ["stop", "restart", "terminate"], "mounts": mounts,
            "gpu": {"id": body["gpu"]["id"], "count": body["gpu"].get("count", 1)},
            "cloud": body.get("cloud", "SECURE"), "dataCenterId": dc, "cudaVersion": "12.8",
            "ssh": {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": f"{pod_id}-64411eb2",
                              "command": f"ssh {pod_id}-64411eb2@ssh.runpod.io"},
                    "direct": {"host": "203.0.113.7", "port": 40022, "username": "root",
                               "command": "ssh root@203.0.113.7 -p 40022"}},
            "template": None, "cost": GPU_TYPES.get(body["gpu"]["id"], {"price": {"secure": 1.0}})[
                "price"]["secure"] * body["gpu"].get("count", 1),
            "locked": False, "globalNetworking": {"enabled": False},
            "runtime": {"uptime": 0, "gpus": [{"util": 97, "memoryUtil": 80}],
                        "ports": [{"private": 22, "public": 40022, "type": "tcp",
                                   "ip": "203.0.113.7"}]},
            "createdAt": _now(), "startedAt": _now(),
        }
        self.pods[pod_id] = pod
        return pod

    def _action(self, pod: dict[str, Any], action: str) -> tuple[int, Any, None]:
        if action not in pod["actions"]:
            raise Problem(409, f"action {action} is not valid for a {pod['status']} pod")
        if action == "terminate":
            del self.pods[pod["id"]]
            return 204, None, None
        if action == "stop":
            pod.update(status="EXITED", runtime=None, actions=["start", "terminate"], ssh={
                "proxy": None, "direct": None})
        else:
            pod.update(status="RUNNING", actions=["stop", "restart", "terminate"],
                       runtime={"uptime": 0, "gpus": [{"util": 0, "memoryUtil": 0}], "ports": []})
        return 200, pod, None

    def _log_stream(self, pod_id: str, request: Request) -> str:
        """SSE as the contract describes it: `id:` and a JSON `data:` with source, line, ts."""
        events = [(f"{e['ts']}/{i + 1:012d}", e) for i, e in enumerate(self.logs.get(pod_id, []))]
        source = request.params.get("source")
        if source:
            events = [ev for ev in events if ev[1]["source"] == source]
        since = request.params.get("since")
        if since:
            events = [ev for ev in events if ev[1]["ts"] >= since]
        after = request.headers.get("Last-Event-ID")
        if after:
            events = [ev for ev in events if ev[0] > after]
        tail = int(request.params.get("tail", 100))
        events = events[-tail:] if tail else []
        return "".join(f"id: {eid}\ndata: {json.dumps(e)}\n\n" for eid, e in events)

    # -- legacy GraphQL (spot) ----------------------------------------------------------------

    def _graphql(self, request: Request) -> dict[str, Any]:
        body = request.body if isinstance(request.body, dict) else {}
        query, variables = body.get("query", ""), body.get("variables") or {}
        if '"' in query:
            return {"errors": [{"message": "values must travel as variables, not in the query"}]}
        if "podRentInterruptable(input: $input)" in query:
            if "$input: PodRentInterruptableInput!" not in query:
                return {"errors": [{"message": 'Variable "$input" must be PodRentInterruptableInput.'}]}
            inp = variables.get("input") or {}
            unknown = sorted(set(inp) - RENT_FIELDS)
            if unknown:
                return {"errors": [{"message": f"unknown input fields: {', '.join(unknown)}"}]}
            if not isinstance(inp.get("bidPerGpu"), (int, float)):
                return {"errors": [{"message": "bidPerGpu is required"}]}
            if inp["gpuTypeId"] in self.full_gpu_types:
                return {"errors": [{"message": NOT_PLACED}]}
            body_v2 = {"name": inp["name"], "image": inp["imageName"], "env": {
                e["key"]: e["value"] for e in inp.get("env", [])},
                "gpu": {"id": inp["gpuTypeId"], "count": inp["gpuCount"]},
                "dataCenterIds": [inp["dataCenterId"]] if inp.get("dataCenterId") else ["EU-RO-1"]}
            pod = self._new_pod(body_v2)
            pod["cost"] = inp["bidPerGpu"] * inp["gpuCount"]
            return {"data": {"podRentInterruptable": {"id": pod["id"], "name": pod["name"],
                                                      "desiredStatus": "RUNNING",
                                                      "costPerHr": pod["cost"]}}}
        if "gpuTypes(input: $input)" in query:
            gpu_id = (variables.get("input") or {}).get("id")
            if gpu_id not in GPU_TYPES:
                return {"data": {"gpuTypes": []}}
            bid = GPU_TYPES[gpu_id]["minBid"]
            return {"data": {"gpuTypes": [{"id": gpu_id, "lowestPrice": {"minimumBidPrice": bid}}]}}
        return {"errors": [{"message": "the fake serves only the spot operations"}]}

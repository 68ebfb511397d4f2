"""A fake RunPod GraphQL API on 127.0.0.1, for running the real `runpod` SDK against in tests.

The SDK posts `{"query": ...}` to `$RUNPOD_API_BASE_URL/graphql` with `Authorization: Bearer <key>`;
podtrain's writes post `{"query": ..., "variables": {...}}` the same way. This server parses that
GraphQL for real (a small parser for the subset both write: operations with variable definitions,
fields, arguments, `$variables`, strings with escapes, numbers, enums, lists, objects), so a request
mangled by string formatting (an unescaped quote in an env value) is a syntax error here as it is
at RunPod. It records every request, keeps pods and volumes in memory, answers the operations
podtrain uses (gpuTypes, myself{networkVolumes,pods}, podFindAndDeployOnDemand,
podRentInterruptable, pod, podStop, podTerminate, createNetworkVolume) with only the fields asked
for, and can answer 401 (wrong key) or GraphQL errors (no capacity, unknown pod, missing bid) the
way RunPod does.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)

# The inputs RunPod accepts for an on-demand pod (all the SDK can write), and for a spot pod.
DEPLOY_FIELDS = frozenset({
    "name", "imageName", "cloudType", "startSsh", "gpuTypeId", "supportPublicIp", "gpuCount",
    "volumeInGb", "minVcpuCount", "minMemoryInGb", "allowedCudaVersions", "dataCenterId",
    "dockerArgs", "countryCode", "containerDiskInGb", "ports", "volumeMountPath", "env",
    "templateId", "networkVolumeId", "minDownload", "minUpload", "stopAfter", "terminateAfter",
})
# The input type each mutation declares for `$input` in RunPod's schema.
INPUT_TYPES = {"podFindAndDeployOnDemand": "PodFindAndDeployOnDemandInput",
               "podRentInterruptable": "PodRentInterruptableInput",
               "createNetworkVolume": "CreateNetworkVolumeInput"}
_DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SPOT_FIELDS = DEPLOY_FIELDS | {"bidPerGpu"}


class Enum(str):
    """A bare GraphQL enum value (SECURE), told apart from the string "SECURE"."""


class GraphQLSyntaxError(ValueError):
    pass


_TOKEN = re.compile(
    r"""(?P<skip>[\s,]+|\#[^\n]*)
      | (?P<punct>[{}()\[\]:!$=@])
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
      | (?P<string>"(?:[^"\\\n\r]|\\["\\/bfnrt]|\\u[0-9A-Fa-f]{4})*")""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise GraphQLSyntaxError(f"Syntax Error: Unexpected character at {pos}: {text[pos]!r}")
        pos = match.end()
        if match.lastgroup != "skip":
            out.append((match.lastgroup, match.group()))
    return out


class _Parser:
    def __init__(self, text: str, variables: dict[str, Any]) -> None:
        self.tokens = _tokens(text)
        self.i = 0
        self.variables = variables
        self.declared: dict[str, str] = {}  # $name -> type, from the operation's definitions

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "eof" or (value is not None and token[1] != value):
            expected = value or "a token"
            raise GraphQLSyntaxError(f"Syntax Error: Expected {expected}, found {token[1]!r}")
        self.i += 1
        return token

    def document(self) -> tuple[str, list[dict[str, Any]]]:
        kind = "query"
        if self.peek()[1] in ("query", "mutation"):
            kind = self.take()[1]
            if self.peek()[0] == "name":
                self.take()
            if self.peek()[1] == "(":
                self.variable_definitions()
        selection = self.selection_set()
        if self.peek()[0] != "eof":
            raise GraphQLSyntaxError(f"Syntax Error: Unexpected {self.peek()[1]!r}")
        return kind, selection

    def variable_definitions(self) -> None:
        """`($input: PodFindAndDeployOnDemandInput!, ...)`; list types are not needed here."""
        self.take("(")
        while self.peek()[1] != ")":
            self.take("$")
            name = self.take()[1]
            self.take(":")
            kind, type_name = self.take()
            if kind != "name":
                raise GraphQLSyntaxError(f"Syntax Error: Expected a type, found {type_name!r}")
            if self.peek()[1] == "!":
                self.take("!")
            self.declared[name] = type_name
        self.take(")")

    def selection_set(self) -> list[dict[str, Any]]:
        self.take("{")
        fields = []
        while self.peek()[1] != "}":
            kind, name = self.take()
            if kind != "name":
                raise GraphQLSyntaxError(f"Syntax Error: Expected Name, found {name!r}")
            args = self.pairs("(", ")") if self.peek()[1] == "(" else {}
            children = self.selection_set() if self.peek()[1] == "{" else []
            fields.append({"name": name, "args": args, "fields": children})
        self.take("}")
        return fields

    def pairs(self, opening: str, closing: str) -> dict[str, Any]:
        """`name: value` pairs between two punctuators: arguments `( )` or an object `{ }`."""
        self.take(opening)
        out = {}
        while self.peek()[1] != closing:
            name = self.take()[1]
            self.take(":")
            out[name] = self.value()
        self.take(closing)
        return out

    def value(self) -> Any:
        kind, text = self.peek()
        if text == "[":
            self.take("[")
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
            self.take("]")
            return items
        if text == "{":
            return self.pairs("{", "}")
        if text == "$":
            self.take("$")
            name = self.take()[1]
            if name not in self.declared:
                raise GraphQLSyntaxError(f'Variable "${name}" is not defined.')
            if name not in self.variables:
                raise GraphQLSyntaxError(f'Variable "${name}" of required type was not provided.')
            return self.variables[name]
        self.take()
        if kind == "string":
            return json.loads(text)  # GraphQL string escapes are JSON's
        if kind == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "name":
            return {"true": True, "false": False, "null": None}.get(text, Enum(text))
        raise GraphQLSyntaxError(f"Syntax Error: Unexpected {text!r}")


def parse(text: str, variables: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(operation kind, top-level fields) of a GraphQL document, or GraphQLSyntaxError."""
    return _Parser(text, variables or {}).document()


def declared_types(text: str) -> dict[str, str]:
    """The variable definitions of an operation: {"input": "PodFindAndDeployOnDemandInput"}."""
    parser = _Parser(text, {})
    if parser.peek()[1] in ("query", "mutation"):
        parser.take()
        if parser.peek()[0] == "name":
            parser.take()
        if parser.peek()[1] == "(":
            parser.variable_definitions()
    return parser.declared


class QueryFailure(Exception):
    """Answered as `{"errors": [{"message": ...}]}`, as RunPod answers a refused operation."""


@dataclass
class Request:
    """One recorded POST: the raw query, the Authorization header, and its parsed top field."""

    query: str
    authorization: str
    variables: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    operation: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)

    @property
    def input(self) -> dict[str, Any]:
        return self.args.get("input") or {}


def _project(value: Any, fields: list[dict[str, Any]]) -> Any:
    """Keep only the fields a selection asked for, as a GraphQL server does."""
    if not fields or value is None:
        return value
    if isinstance(value, list):
        return [_project(item, fields) for item in value]
    return {f["name"]: _project(value.get(f["name"]), f["fields"]) for f in fields}


GPU_TYPES = {
    "NVIDIA A100 80GB PCIe": {"displayName": "A100 PCIe", "memoryInGb": 80, "securePrice": 1.64,
                              "communityPrice": 1.19, "secureSpotPrice": 0.82, "minBid": 0.6},
    "NVIDIA A100-SXM4-80GB": {"displayName": "A100 SXM", "memoryInGb": 80, "securePrice": 1.89,
                              "communityPrice": 1.39, "secureSpotPrice": 0.95, "minBid": 0.7},
    "NVIDIA H100 80GB HBM3": {"displayName": "H100 SXM", "memoryInGb": 80, "securePrice": 2.99,
                              "communityPrice": 2.69, "secureSpotPrice": 1.75, "minBid": 1.2},
}


class FakeRunPod:
    """The fake API: `with FakeRunPod(api_key) as api:` serves on `api.url` until the block ends."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Request] = []
        self.pods: dict[str, dict[str, Any]] = {}
        self.volumes = [
            {"id": "vol9test42", "name": "transformer-shared", "size": 1000,
             "dataCenterId": "EU-RO-1"}
        ]
        self.capacity = True
        self.full_gpu_types: set[str] = set()  # GPU types with no capacity left
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

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

    def add_pod(self, uptimeSeconds: int = 0, costPerHr: float | None = None,  # noqa: N803
                **overrides: Any) -> dict[str, Any]:
        """Seed a running pod, as if created earlier (and running for `uptimeSeconds`)."""
        pod = self._new_pod({"name": "seeded", "imageName": "runpod/pytorch:test", "gpuCount": 1,
                             "gpuTypeId": "NVIDIA A100 80GB PCIe", "ports": "6006/http,22/tcp",
                             "env": [], **overrides}, spot=False)
        pod["uptimeSeconds"] = uptimeSeconds
        if costPerHr is not None:
            pod["costPerHr"] = costPerHr
        return pod

    # -- request handling -------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                status, answer = fake._answer(self.path, auth, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _answer(self, path: str, authorization: str, body: bytes) -> tuple[int, Any]:
        payload = json.loads(body or b"{}")
        query, variables = payload.get("query", ""), payload.get("variables") or {}
        request = Request(query=query, authorization=authorization, variables=variables)
        with self._lock:
            self.requests.append(request)
            if path != "/graphql":
                return 404, {"error": f"no route {path}"}
            if authorization != f"Bearer {self.api_key}":
                return 401, {"error": "Unauthorized"}
            try:
                request.kind, selection = parse(query, variables)
            except GraphQLSyntaxError as exc:
                return 400, {"errors": [{"message": str(exc)}]}
            top = selection[0]
            wanted = INPUT_TYPES.get(top["name"])
            if wanted and "$input" in query and declared_types(query).get("input") != wanted:
                return 400, {"errors": [{"message": f'Variable "$input" must be {wanted}.'}]}
            request.operation, request.args = top["name"], top["args"]
            request.fields = [f["name"] for f in top["fields"]]
            try:
                value = self._resolve(request.kind, top)
            except QueryFailure as exc:
                return 200, {"errors": [{"message": str(exc), "path": [top["name"]]}], "data": None}
            return 200, {"data": {top["name"]: _project(value, top["fields"])}}

    def _resolve(self, kind: str, top: dict[str, Any]) -> Any:
        name, args = top["name"], top["args"]
        inp = args.get("input") or {}
        if kind == "query" and name == "gpuTypes":
            wanted = [inp["id"]] if "id" in inp else list(GPU_TYPES)
            count = int(_arg(top, "lowestPrice", "gpuCount") or 1)
            return [self._gpu(gpu_id, count) for gpu_id in wanted if gpu_id in GPU_TYPES]
        if kind == "query" and name == "myself":
            return {"id": "user-fake", "pubKey": "", "networkVolumes": self.volumes,
                    "pods": list(self.pods.values())}
        if kind == "query" and name == "pod":
            return self.pods.get(inp.get("podId"))
        if kind == "mutation" and name in ("podFindAndDeployOnDemand", "podRentInterruptable"):
            return self._deploy(inp, spot=name == "podRentInterruptable")
        if kind == "mutation" and name == "podStop":
            pod = self._pod(inp)
            pod.update(desiredStatus="EXITED", runtime=None)
            return pod
        if kind == "mutation" and name == "podTerminate":
            self.pods.pop(self._pod(inp)["id"])
            return None
        if kind == "mutation" and name == "createNetworkVolume":
            volume = {"id": f"vol{len(self.volumes) + 1}fake", "name": inp["name"],
                      "size": inp["size"], "dataCenterId": inp["dataCenterId"]}
            self.volumes.append(volume)
            return volume
        raise QueryFailure(f'Cannot query field "{name}" on type "{kind.title()}".')

    def _gpu(self, gpu_id: str, count: int) -> dict[str, Any]:
        gpu = GPU_TYPES[gpu_id]
        return {"id": gpu_id, "maxGpuCount": 8, "manufacturer": "Nvidia", "cudaCores": 0,
                "secureCloud": True, "communityCloud": True, **gpu,
                "lowestPrice": {"minimumBidPrice": gpu["minBid"] * count,
                                "uninterruptablePrice": gpu["communityPrice"] * count}}

    def _pod(self, inp: dict[str, Any]) -> dict[str, Any]:
        pod = self.pods.get(inp.get("podId"))
        if pod is None:
            raise QueryFailure("Pod not found")
        return pod

    def _deploy(self, inp: dict[str, Any], spot: bool) -> dict[str, Any]:
        allowed = SPOT_FIELDS if spot else DEPLOY_FIELDS
        unknown = sorted(set(inp) - allowed)
        if unknown:
            raise QueryFailure(f'Field "{unknown[0]}" is not defined by the pod input type.')
        if spot and not isinstance(inp.get("bidPerGpu"), (int, float)):
            raise QueryFailure('Field "bidPerGpu" of required type "Float!" was not provided.')
        if inp.get("cloudType") not in ("SECURE", "COMMUNITY", "ALL"):  # an enum or a variable
            raise QueryFailure('Expected type "CloudTypeEnum" for cloudType.')
        for key in ("stopAfter", "terminateAfter"):
            if inp.get(key) is not None and not _DATETIME.match(str(inp[key])):
                raise QueryFailure(f'Expected type "DateTime" for {key}.')
        cuda = inp.get("allowedCudaVersions")
        if cuda is not None and not (isinstance(cuda, list) and all(isinstance(v, str) for v in cuda)):
            raise QueryFailure('Expected type "[CudaVersion]" for allowedCudaVersions.')
        if inp.get("gpuTypeId") not in GPU_TYPES:
            raise QueryFailure("Invalid GPU type.")
        volume = next((v for v in self.volumes if v["id"] == inp.get("networkVolumeId")), None)
        if inp.get("networkVolumeId") and (volume is None or
                                           inp.get("dataCenterId") != volume["dataCenterId"]):
            raise QueryFailure("Network volume is not in the requested data center.")
        if not self.capacity or inp["gpuTypeId"] in self.full_gpu_types:
            raise QueryFailure(NO_CAPACITY)
        if spot and inp["bidPerGpu"] < GPU_TYPES[inp["gpuTypeId"]]["minBid"]:
            raise QueryFailure("Your bid is below the minimum bid price.")
        return self._new_pod(inp, spot=spot)

    def _new_pod(self, inp: dict[str, Any], spot: bool) -> dict[str, Any]:
        pod_id = f"fakepod{len(self.pods) + 1:03d}x"
        gpu = GPU_TYPES[inp["gpuTypeId"]]
        count = inp.get("gpuCount") or 1
        price = inp["bidPerGpu"] if spot else gpu["securePrice"]
        pod = {
            "id": pod_id, "name": inp["name"], "imageName": inp["imageName"],
            "desiredStatus": "RUNNING", "podType": "INTERRUPTABLE" if spot else "RESERVED",
            "gpuCount": count, "costPerHr": round(price * count, 3),
            "containerDiskInGb": inp.get("containerDiskInGb"), "volumeInGb": inp.get("volumeInGb"),
            "volumeMountPath": inp.get("volumeMountPath"), "dockerArgs": inp.get("dockerArgs"),
            "dockerId": None, "ports": inp.get("ports"), "port": None,
            "allowedCudaVersions": inp.get("allowedCudaVersions"), "stopAfter": inp.get("stopAfter"),
            "gpuTypeId": inp["gpuTypeId"], "networkVolumeId": inp.get("networkVolumeId"),
            "env": [f"{e['key']}={e['value']}" for e in inp.get("env") or []],
            "memoryInGb": inp.get("minMemoryInGb"), "vcpuCount": inp.get("minVcpuCount"),
            "uptimeSeconds": 0, "lastStatusChange": "Rented by User", "machineId": "machine-fake",
            "machine": {"podHostId": f"{pod_id}-64410e5c", "gpuDisplayName": gpu["displayName"]},
            "runtime": {"ports": [
                {"ip": "203.0.113.7", "isIpPublic": True, "privatePort": 22, "publicPort": 40022,
                 "type": "tcp"},
                {"ip": "100.65.0.2", "isIpPublic": False, "privatePort": 6006, "publicPort": 6006,
                 "type": "http"},
            ]},
        }
        self.pods[pod_id] = pod
        return pod


def _arg(top: dict[str, Any], field_name: str, arg: str) -> Any:
    """An argument of a nested field's input (gpuTypes { lowestPrice(input: {gpuCount: 2}) })."""
    for child in top["fields"]:
        if child["name"] == field_name:
            return (child["args"].get("input") or {}).get(arg)
    return None

"""The RunPod pod manifest (`infra/runpod-pod.yaml`): a pydantic model checked before any request.

Why so strict: a pod that boots with a typo costs GPU hours, and a literal token in a manifest ends
up in git and in RunPod's pod record. So every problem is caught here and reported as ONE line
naming the key path (`volumeMounts[0].volumeName: ...`), and secret-looking values are never echoed.
Every string in the file (command, name, image, env names and values, ...) is checked for token
shapes and `scheme://user:password@` URLs, and any message that names one masks it. Quotes,
backslashes and newlines are fine: the request is JSON (pods/rest.py).

The safety rails live here with safe defaults, so a forgotten key never means an unbounded bill:
`minCudaVersion` (read from the image tag when not given), `maxRuntimeHours` (an absolute
`RUN_DEADLINE` in the pod's env: boot.sh stops the pod then, `orchestrate pod reap` from outside;
RunPod itself enforces no runtime cap), `maxHourlyPrice`/`maxTotalPrice` (refused before create),
`watchdogMinutes` (boot.sh stops a hung stage), a list of GPU types tried in order.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.experiment_config import named_config
from orchestrator.pods.gitref import GitRefError, files_at_ref

#: The mount point every path in configs/ and infra/boot.sh assumes.
WORKSPACE = "/workspace"
#: The placeholder the shipped manifest carries until the user sets a real volume id.
VOLUME_PLACEHOLDER = "YOUR_VOLUME_ID"

#: RunPod's spot window between SIGTERM and SIGKILL: the trainer's grace on a spot pod.
SPOT_GRACE_S = 5
#: Env keys `pod create` sets itself (the contract with boot.sh and `pod reap`), never the user.
MANAGED_ENV = ("PODTRAIN_MANAGED", "RUN_DEADLINE", "RUN_VOLUME_ID", "BOOT_WATCHDOG_MINUTES")
#: Manifest keys that REST v2 cannot express, with what to do instead (refused, never ignored).
_RETIRED_KEYS = {
    "minVcpuCount": "REST v2 has no CPU floor for GPU pods (RunPod allots vCPUs per GPU): remove it",
    "minMemoryInGb": "REST v2 has no RAM floor for GPU pods (RunPod allots RAM per GPU): remove it",
    "terminateAfterHours": "RunPod enforces no terminate time (GraphQL's terminateAfter was "
                           "ignored): remove it; `orchestrate pod reap --terminate` deletes pods "
                           "past maxRuntimeHours",
}
# The CUDA version in an image tag: runpod/pytorch:...-cu1281-... or ...-cuda12.8.1-...
_IMAGE_CUDA = re.compile(r"(?:cu|cuda)(1[0-9])\.?([0-9])(?:\.?[0-9])?(?![0-9])")
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
# Names that match the secret pattern but hold public material: RunPod images read PUBLIC_KEY as
# the SSH public key to authorize.
_PUBLIC_NAMES = frozenset({"PUBLIC_KEY"})
_SECRET_REF = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_.-]+\s*\}\}$")
# Known credential shapes, refused in any string of the manifest: GitHub (ghp_, gho_, ghu_, ghs_,
# ghr_, github_pat_), GitLab (glpat-), Hugging Face (hf_), RunPod (rpa_), OpenAI-style (sk-), AWS
# access key ids (AKIA/ASIA), Slack (xox?-), and any URL carrying `user:password@`.
_TOKEN_SHAPES = (
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"glpat-[A-Za-z0-9_-]{20,}",
    r"hf_[A-Za-z0-9]{20,}",
    r"rpa_[A-Za-z0-9]{20,}",
    r"sk-[A-Za-z0-9_-]{20,}",
    r"(?:AKIA|ASIA)[A-Z0-9]{16}",
    r"xox[abposr]-[A-Za-z0-9-]{10,}",
)
_LITERAL_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(?P<token>" + "|".join(_TOKEN_SHAPES) + r")"
    r"|(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/:@]+):(?P<password>[^\s/@]+)@"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPERIMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PORT = re.compile(r"^([0-9]{1,5})/(http|tcp)$")


class ManifestError(ValueError):
    """A manifest problem, as one line: `<file>: <key path>: <what is wrong>`."""


class _KeyedError(ValueError):
    """A validator error that knows its exact key path (pydantic only knows the field)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def cuda_floor_for(image: str) -> str | None:
    """The CUDA version an image tag names (`cu1281` -> '12.8'): the host's floor for it."""
    match = _IMAGE_CUDA.search(image.rpartition(":")[2])
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else None


def mask(text: str) -> str:
    """`text` with every token shape and URL password replaced by its kind and `***`."""

    def hide(match: re.Match[str]) -> str:
        if match.group("token"):
            token = match.group("token")
            prefix = re.match(r"[a-z_]+[_-]|AKIA|ASIA", token)
            return f"{prefix.group() if prefix else ''}***"
        return f"{match.group('scheme')}{match.group('user')}:***@"

    return _LITERAL_TOKEN.sub(hide, text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class VolumeMount(_Strict):
    """The network volume: datasets, tokenizer, checkpoints and the checkout live on it."""

    volume_name: str = Field(alias="volumeName")
    mount_path: str = Field(WORKSPACE, alias="mountPath")

    @field_validator("volume_name")
    @classmethod
    def _real_volume(cls, value: str, info: ValidationInfo) -> str:
        where = "find it with `orchestrate volume list` or the console's Storage page"
        if not value.strip():
            raise ValueError(f"is empty: set your network volume id; {where}")
        placeholder = value.strip() == VOLUME_PLACEHOLDER or value.startswith("<")
        if placeholder and not _placeholders_ok(info):
            raise ValueError(f"set your network volume id (placeholder {VOLUME_PLACEHOLDER!r}); {where}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError(f"{value!r} is not a RunPod volume id (letters, digits, - and _)")
        return value

    @field_validator("mount_path")
    @classmethod
    def _workspace_only(cls, value: str) -> str:
        if value != WORKSPACE:
            raise ValueError(
                f"must be {WORKSPACE}: infra/boot.sh and every config under configs/ use it"
            )
        return value


class PodManifest(_Strict):
    """What `orchestrate pod create -f` sends: one field per RunPod pod setting."""

    name: str
    image: str = Field(min_length=1)
    #: One GPU type id, or a list tried in order when RunPod has no capacity for the first.
    gpu_type: str | list[str] = Field(alias="gpuType", min_length=1)
    gpu_count: int = Field(1, alias="gpuCount", ge=1, le=8)
    cloud_type: Literal["secure", "community"] = Field("secure", alias="cloudType")
    #: Legacy: an interruptible pod exists only in RunPod's GraphQL API (pods/spot.py).
    spot: bool = False
    bid_per_gpu: float | None = Field(None, alias="bidPerGpu", gt=0, le=100)
    container_disk_in_gb: int = Field(50, alias="containerDiskInGb", ge=10, le=2000)
    volume_mounts: list[VolumeMount] = Field(alias="volumeMounts", min_length=1, max_length=1)
    ports: list[str] = Field(default_factory=lambda: ["6006/http", "22/tcp"])
    env: dict[str, str] = Field(default_factory=dict)
    command: str = ""
    #: The host CUDA floor (`gpu.minCudaVersion`); None: read from the image tag.
    min_cuda_version: str | None = Field(None, alias="minCudaVersion", pattern=r"^\d+\.\d+$")
    #: An explicit closed list of host CUDA versions (`gpu.allowedCudaVersions`, matched exactly:
    #: a host with a newer CUDA is excluded), sent only when given.
    allowed_cuda_versions: list[str] | None = Field(None, alias="allowedCudaVersions", min_length=1)
    #: The pod's deadline, this long after creation: RUN_DEADLINE in its env (boot.sh stops the
    #: pod then; `orchestrate pod reap` from outside). RunPod enforces no runtime cap itself.
    max_runtime_hours: float = Field(72, alias="maxRuntimeHours", gt=0, le=24 * 31)
    #: Refuse a pod whose catalog price (all its GPUs) is above this many $/h.
    max_hourly_price: float | None = Field(None, alias="maxHourlyPrice", gt=0)
    #: Refuse a pod whose price times maxRuntimeHours is above this many $.
    max_total_price: float | None = Field(None, alias="maxTotalPrice", gt=0)
    #: boot.sh stops a pod whose stage shows no progress for this long (0: no watchdog).
    watchdog_minutes: float = Field(30, alias="watchdogMinutes", ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_tokens(cls, data: Any) -> Any:
        """Every string in the file, keys included, is checked for a token shape, first; keys
        REST v2 cannot express are refused with what to do instead."""
        for path, text in _strings(data, ""):
            if looks_like_literal_token(text):
                raise _KeyedError(
                    path or "(top level)",
                    "looks like a literal access token or a URL with a password; put it in a "
                    "RunPod secret and write '{{ RUNPOD_SECRET_<name> }}' in env (it is never "
                    "sent or printed)",
                )
        for key, message in _RETIRED_KEYS.items():
            if isinstance(data, dict) and key in data:
                raise _KeyedError(key, message)
        return data

    @field_validator("gpu_type")
    @classmethod
    def _gpu_types(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        for i, name in enumerate(names):
            if not name.strip():
                raise _KeyedError("gpuType" if isinstance(value, str) else f"gpuType[{i}]",
                                  "must not be empty")
        if len(set(names)) != len(names):
            raise ValueError("lists a GPU type twice")
        return value

    @field_validator("allowed_cuda_versions")
    @classmethod
    def _cuda(cls, value: list[str] | None) -> list[str] | None:
        for i, version in enumerate(value or []):
            if not re.fullmatch(r"\d+\.\d+", version):
                raise _KeyedError(f"allowedCudaVersions[{i}]", f"{version!r} is not a CUDA "
                                  "version like '12.8'")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[str]) -> list[str]:
        for i, port in enumerate(value):
            match = _PORT.fullmatch(port.strip())
            if not match or not 1 <= int(match.group(1)) <= 65535:
                raise _KeyedError(f"ports[{i}]", f"{port!r} is not PORT/http or PORT/tcp")
        return [port.strip() for port in value]

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, value: Any) -> Any:
        """YAML reads `RUN_SHARD: 0` as an int; env values are strings, so numbers are accepted."""
        if not isinstance(value, dict):
            return value
        converted = {}
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise _KeyedError(
                    _env_path(key), f"must be a string (quote it), not {type(item).__name__}"
                )
            converted[key] = item if isinstance(item, str) else str(item)
        return converted

    @field_validator("env")
    @classmethod
    def _env_rules(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            _check_env_item(key, value)
        return env

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> PodManifest:
        if self.spot and self.bid_per_gpu is None:
            raise _KeyedError(
                "bidPerGpu", "spot: true needs a bid in $/h per GPU (the console shows the minimum)"
            )
        if (self.min_cuda_version is None and self.allowed_cuda_versions is None
                and cuda_floor_for(self.image) is None):
            raise _KeyedError(
                "minCudaVersion", "the image tag names no CUDA version (like cu1281): set the "
                "host CUDA floor it needs, e.g. minCudaVersion: '12.8'"
            )
        if self.cloud_type == "community":
            raise _KeyedError(
                "cloudType", "community cloud cannot mount a network volume (volumeMounts): use "
                "secure"
            )
        repo, ref = self.env.get("RUN_REPO", ""), self.env.get("RUN_REF", "")
        if "RUN_REPO" in self.command and not repo:
            raise _KeyedError("env.RUN_REPO", "the command clones $RUN_REPO: set it to your "
                              "podtrain repository (or bake the image: infra/Dockerfile)")
        if _placeholders_ok(info):
            return self  # a template (--print-runpodctl): no repository to check yet
        if "YOUR_ORG" in repo:
            raise _KeyedError("env.RUN_REPO", "set your podtrain repository (placeholder "
                              "'YOUR_ORG'): a git URL the pod can clone")
        if repo and not ref:
            raise _KeyedError("env.RUN_REF", "set the commit or tag of RUN_REPO the pod runs")
        if "RUN_CONFIG" in self.env:
            check_config(self.env["RUN_CONFIG"], ref or None)
        return self

    @property
    def gpu_types(self) -> list[str]:
        """The GPU types to try, in order."""
        return [self.gpu_type] if isinstance(self.gpu_type, str) else list(self.gpu_type)

    @property
    def cuda_floor(self) -> str | None:
        """`gpu.minCudaVersion`: the manifest's, else the image tag's CUDA (None when the user
        gave only an explicit allowedCudaVersions list)."""
        if self.min_cuda_version or self.allowed_cuda_versions:
            return self.min_cuda_version
        return cuda_floor_for(self.image)

    def pod_env(self, deadline: int) -> dict[str, str]:
        """The env the pod gets: the manifest's, plus what boot.sh and `pod reap` need.

        PODTRAIN_MANAGED=1 marks the pod as podtrain's (the reaper touches no other pod);
        RUN_DEADLINE is the absolute stop time, Unix seconds UTC; RUN_VOLUME_ID labels the pod
        with its volume, so a second pod for the same experiment on the same volume can be
        refused; a spot pod's trainer gets RunPod's real grace window.
        """
        env = dict(self.env)
        env["PODTRAIN_MANAGED"] = "1"
        env["RUN_DEADLINE"] = str(deadline)
        env["RUN_VOLUME_ID"] = self.volume_id
        env["BOOT_WATCHDOG_MINUTES"] = f"{self.watchdog_minutes:g}"
        if self.spot:
            env["RUN_PREEMPTION_GRACE_S"] = str(SPOT_GRACE_S)
        return env

    @property
    def volume_id(self) -> str:
        return self.volume_mounts[0].volume_name

    @property
    def experiment(self) -> str:
        return self.env.get("RUN_EXPERIMENT", "runpod-1b")

    @property
    def pod_name(self) -> str:
        """The pod's name, with `{experiment}` filled in so a profile switch renames the pod too."""
        return self.name.replace("{experiment}", self.experiment)

    def with_overrides(
        self,
        *,
        config: str | None = None,
        experiment: str | None = None,
        shard: bool | None = None,
        shard_lines: int | None = None,
        placeholders_ok: bool = False,
    ) -> PodManifest:
        """Return a copy with the boot knobs overridden, validated like the file itself.

        ``--experiment runpod-2b`` without ``--config`` also sets RUN_CONFIG to configs/runpod_2b.yaml
        when the project has it, as ``orchestrate --experiment`` does.
        """
        env = dict(self.env)
        if experiment is not None and config is None:
            config = named_config(experiment)
        for key, value in (
            ("RUN_CONFIG", config),
            ("RUN_EXPERIMENT", experiment),
            ("RUN_SHARD", None if shard is None else ("1" if shard else "0")),
            ("SHARD_LINES", None if shard_lines is None else str(shard_lines)),
        ):
            if value is not None:
                env[key] = value
        data = self.model_dump(by_alias=True)
        data["env"] = env
        return _validate(data, "command line", placeholders_ok)


def _env_path(key: str) -> str:
    key = mask(str(key))
    return f"env.{key}" if _ENV_NAME.match(key) else f"env[{key!r}]"


def is_secret_name(name: str) -> bool:
    """Env names whose value must be a RunPod secret reference (never shown, never literal)."""
    return bool(_SECRET_NAME.search(name)) and name not in _PUBLIC_NAMES


def is_secret_reference(value: str) -> bool:
    return bool(_SECRET_REF.match(value.strip()))


def looks_like_literal_token(value: str) -> bool:
    return bool(_LITERAL_TOKEN.search(value))


def _check_env_item(key: str, value: str) -> None:
    path = _env_path(key)
    if not _ENV_NAME.match(key):
        raise _KeyedError(
            path, "is not a valid variable name; env names are letters, digits and _ (no leading digit)"
        )
    if is_secret_name(key) and not is_secret_reference(value):
        raise _KeyedError(
            path,
            "a secret must be a RunPod secret reference, never a literal: create the secret in the "
            "console (Secrets) and write '{{ RUNPOD_SECRET_<name> }}'",
        )
    if key in MANAGED_ENV:
        raise _KeyedError(path, "is set by `orchestrate pod create` itself: remove it (see "
                          "maxRuntimeHours, watchdogMinutes, volumeMounts)")
    _check_knob(path, key, value)


def _check_knob(path: str, key: str, value: str) -> None:
    """The boot knobs fail here, not minutes into a paid boot."""
    if key == "RUN_SHARD" and value not in ("auto", "0", "1"):
        raise _KeyedError(path, f"must be 'auto', '0' or '1' (as boot.sh reads it), not {value!r}")
    if key == "SHARD_LINES" and not (value.isdigit() and int(value) > 0):
        raise _KeyedError(path, f"must be a positive integer, not {value!r}")
    if key == "RUN_EXPERIMENT" and not _EXPERIMENT.match(value):
        raise _KeyedError(path, f"{value!r} is not a folder name (letters, digits, . _ -)")


def check_config(value: str, ref: str | None) -> None:
    """RUN_CONFIG is relative to the checkout the pod runs: the commit RUN_REF names when the pod
    clones RUN_REPO (read from this repository's git objects), else this working tree (the image
    is built from it)."""
    path = "env.RUN_CONFIG"
    config = Path(value)
    if config.is_absolute():
        return  # a config elsewhere on the volume: only the pod can see it
    if ".." in config.parts:
        raise _KeyedError(path, f"{value!r} must stay inside the project (no '..')")
    project = Path(__file__).resolve().parents[2]
    if ref is None:
        configs = project / "configs"
        if configs.is_dir() and not (project / config).is_file():
            known = ", ".join(sorted(f"configs/{p.name}" for p in configs.glob("*.yaml")))
            raise _KeyedError(path, f"{value} is not in this checkout ({project}); known: {known}")
        return
    try:
        files = files_at_ref(project, ref, "configs")
    except GitRefError as exc:
        raise _KeyedError("env.RUN_REF", str(exc)) from None
    if config.as_posix() not in files:
        known = ", ".join(sorted(f for f in files if f.endswith(".yaml")))
        raise _KeyedError(path, f"{value} is not in RUN_REF {ref}; known there: {known}")


def _strings(data: Any, path: str) -> list[tuple[str, str]]:
    """Every string in a parsed manifest, keys included, with its key path."""
    if isinstance(data, str):
        return [(path, data)]
    if isinstance(data, dict):
        out = []
        for key, value in data.items():
            child = f"{path}.{key}" if path else str(key)
            out += _strings(key, child) + _strings(value, child)
        return out
    if isinstance(data, list):
        return [item for i, value in enumerate(data) for item in _strings(value, f"{path}[{i}]")]
    return []


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = VolumeMount if loc and loc[0] == "volumeMounts" else PodManifest
    return [field.alias or name for name, field in model.model_fields.items()]


def _one_line(error: dict[str, Any]) -> str:
    """One pydantic error as `key.path: message`; the offending value is never echoed, and a
    token used as a key is masked."""
    return mask(_unmasked_line(error))


def _unmasked_line(error: dict[str, Any]) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyedError):
        return f"{cause.path}: {cause.message}"
    loc = tuple(error["loc"])
    path = _format_loc(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{path}: {message}"


def _placeholders_ok(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("placeholders_ok"))


def _validate(data: Any, source: str, placeholders_ok: bool = False) -> PodManifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: the manifest must be a YAML mapping of keys")
    try:
        return PodManifest.model_validate(data, context={"placeholders_ok": placeholders_ok})
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{source}: {_one_line(errors[0])}{more}") from None


def load_manifest(path: str | Path, placeholders_ok: bool = False) -> PodManifest:
    """Read and validate a manifest file; every failure is a ManifestError of one line.

    `placeholders_ok` accepts the shipped template's YOUR_VOLUME_ID and YOUR_ORG (and skips the
    RUN_REF/RUN_CONFIG checks that need a real repository): for printing, never for creating.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ManifestError(f"{path}{where}: invalid YAML: {problem}") from None
    return _validate(data, str(path), placeholders_ok)

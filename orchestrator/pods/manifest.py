"""The RunPod pod manifest (`infra/runpod-pod.yaml`): a pydantic model checked before any request.

Why so strict: the runpod SDK (1.12) builds its GraphQL by string formatting with no escaping, so a
quote, backslash or newline in any string it formats (name, image, command, env names and values,
volume id) breaks or rewrites the request. A pod that boots with a typo costs GPU hours; a literal
token in a manifest ends up in git. So every problem is caught here and reported as ONE line naming
the key path (`volumeMounts[0].volumeName: ...`), and secret-looking values are never echoed.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

#: The mount point every path in configs/ and infra/boot.sh assumes.
WORKSPACE = "/workspace"
#: The placeholder the shipped manifest carries until the user sets a real volume id.
VOLUME_PLACEHOLDER = "YOUR_VOLUME_ID"

_UNSAFE = {'"': "a double quote", "\\": "a backslash", "\n": "a newline", "\r": "a carriage return"}
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
# Names that match the secret pattern but hold public material: RunPod images read PUBLIC_KEY as
# the SSH public key to authorize.
_PUBLIC_NAMES = frozenset({"PUBLIC_KEY"})
_SECRET_REF = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_.-]+\s*\}\}$")
# Known credential shapes (Hugging Face, RunPod, OpenAI-style): refused under ANY env name.
_LITERAL_TOKEN = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|rpa_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})")
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


def graphql_safe(value: str) -> str:
    """Refuse the characters the SDK would paste unescaped into a GraphQL string literal."""
    for char, name in _UNSAFE.items():
        if char in value:
            raise ValueError(
                f"contains {name}; the runpod SDK pastes it unescaped into its GraphQL request, "
                "so it is refused (use single quotes in shell commands)"
            )
    return value


SafeStr = Annotated[str, AfterValidator(graphql_safe)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class VolumeMount(_Strict):
    """The network volume: datasets, tokenizer, checkpoints and the checkout live on it."""

    volume_name: SafeStr = Field(alias="volumeName")
    mount_path: SafeStr = Field(WORKSPACE, alias="mountPath")

    @field_validator("volume_name")
    @classmethod
    def _real_volume(cls, value: str) -> str:
        if not value.strip() or value.strip() == VOLUME_PLACEHOLDER or value.startswith("<"):
            raise ValueError(
                f"set your network volume id (placeholder {VOLUME_PLACEHOLDER!r}); "
                "find it with `runpodctl network-volume list` or the console's Storage page"
            )
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

    name: SafeStr
    image: SafeStr = Field(min_length=1)
    gpu_type: SafeStr = Field(alias="gpuType", min_length=1)
    gpu_count: int = Field(1, alias="gpuCount", ge=1, le=8)
    cloud_type: Literal["secure", "community", "all"] = Field("secure", alias="cloudType")
    spot: bool = False
    bid_per_gpu: float | None = Field(None, alias="bidPerGpu", gt=0, le=100)
    container_disk_in_gb: int = Field(50, alias="containerDiskInGb", ge=10, le=2000)
    min_vcpu_count: int = Field(1, alias="minVcpuCount", ge=1)
    min_memory_in_gb: int = Field(1, alias="minMemoryInGb", ge=1)
    volume_mounts: list[VolumeMount] = Field(alias="volumeMounts", min_length=1, max_length=1)
    ports: list[SafeStr] = Field(default_factory=lambda: ["6006/http", "22/tcp"])
    env: dict[str, str] = Field(default_factory=dict)
    command: SafeStr = ""

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
    def _spot_needs_bid(self) -> PodManifest:
        if self.spot and self.bid_per_gpu is None:
            raise _KeyedError(
                "bidPerGpu", "spot: true needs a bid in $/h per GPU (the console shows the minimum)"
            )
        return self

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
    ) -> PodManifest:
        """Return a copy with the boot knobs overridden, validated like the file itself."""
        env = dict(self.env)
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
        return _validate(data, "command line")


def _env_path(key: str) -> str:
    return f"env.{key}" if _ENV_NAME.match(str(key)) else f"env[{key!r}]"


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
        bad = next((name for char, name in _UNSAFE.items() if char in key), None)
        why = f"contains {bad}" if bad else "is not a valid variable name"
        raise _KeyedError(path, f"{why}; env names are letters, digits and _ (no leading digit)")
    try:
        graphql_safe(value)
    except ValueError as exc:
        raise _KeyedError(path, str(exc)) from None
    if is_secret_name(key) and not is_secret_reference(value):
        raise _KeyedError(
            path,
            "a secret must be a RunPod secret reference, never a literal: create the secret in the "
            "console (Secrets) and write '{{ RUNPOD_SECRET_<name> }}'",
        )
    if looks_like_literal_token(value):
        raise _KeyedError(path, "looks like a literal access token; use a RunPod secret reference")
    _check_knob(path, key, value)


def _check_knob(path: str, key: str, value: str) -> None:
    """The boot knobs fail here, not minutes into a paid boot."""
    if key == "RUN_SHARD" and value not in ("0", "1"):
        raise _KeyedError(path, f"must be '0' or '1', not {value!r}")
    if key == "SHARD_LINES" and not (value.isdigit() and int(value) > 0):
        raise _KeyedError(path, f"must be a positive integer, not {value!r}")
    if key == "RUN_EXPERIMENT" and not _EXPERIMENT.match(value):
        raise _KeyedError(path, f"{value!r} is not a folder name (letters, digits, . _ -)")
    if key == "RUN_CONFIG":
        _check_config_path(path, value)


def _check_config_path(path: str, value: str) -> None:
    """RUN_CONFIG is relative to the checkout; when this is one, check the file is in it."""
    config = Path(value)
    if config.is_absolute():
        return  # a config elsewhere on the volume: only the pod can see it
    if ".." in config.parts:
        raise _KeyedError(path, f"{value!r} must stay inside the project (no '..')")
    project = Path(__file__).resolve().parents[2]
    configs = project / "configs"
    if configs.is_dir() and not (project / config).is_file():
        known = ", ".join(sorted(f"configs/{p.name}" for p in configs.glob("*.yaml")))
        raise _KeyedError(path, f"{value} is not in this checkout ({project}); known: {known}")


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
    """One pydantic error as `key.path: message`; the offending value is never echoed."""
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


def _validate(data: Any, source: str) -> PodManifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: the manifest must be a YAML mapping of keys")
    try:
        return PodManifest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{source}: {_one_line(errors[0])}{more}") from None


def load_manifest(path: str | Path) -> PodManifest:
    """Read and validate a manifest file; every failure is a ManifestError of one line."""
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
    return _validate(data, str(path))

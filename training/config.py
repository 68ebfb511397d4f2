"""The training config schema: the single source of truth for a run.

One tree of pydantic v2 models, read from YAML, JSON or TOML (by extension), with ``key=value``
overrides on dotted paths. Unknown keys and wrong types fail with one line naming the file and
the key path, so a typo never silently trains with a default. The orchestrator emits
``training.yaml`` and ``training.toml`` from the same object, and both load back to it.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.aliases import ALIASES, AliasError, canonical_key, describe, rename_aliases, resolve_min_lr

CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming file and key."""


class _Strict(BaseModel):
    """Unknown keys are errors, and so is a non-finite float anywhere (``optimizer.lr=inf`` trains NaN weights)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AttentionConfig(_Strict):
    type: Literal["standard", "complex"] = Field(
        "standard", description="complex: heads as complex vectors, values rotated by the query-key phase (training/complex_attention.py)")
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="GQA/MQA key-value heads; None = n_heads")
    impl: Literal["auto", "flex", "sdpa"] = Field(
        "auto", description="packed examples (doc_ids): flex = FlexAttention with a document-causal BlockMask, "
                            "sdpa = SDPA with a dense (B,1,T,T) mask; auto = flex on CUDA, sdpa elsewhere")


class PositionalConfig(_Strict):
    type: Literal["rope", "learned"] = "rope"
    theta: float = Field(10000.0, gt=0)


class FFNConfig(_Strict):
    """The feed-forward of every block: a dense MLP, or a mixture of SwiGLU experts (``type: moe``, see training/moe.py)."""

    type: Literal["swiglu", "gelu", "moe"] = "swiglu"
    hidden_size: int | None = Field(None, ge=1, description="None = 4*d_model (gelu) or 8/3*d_model rounded (swiglu)")
    num_experts: int = Field(8, ge=1, description="moe: experts per layer")
    top_k: int = Field(2, ge=1, description="moe: experts each token is sent to")
    expert_hidden_size: int | None = Field(None, ge=1, description="moe: SwiGLU width of one expert; None = hidden_size rule")
    shared_expert: bool = Field(False, description="moe: one more expert every token goes through (DeepSeek-style)")
    load_balance_coef: float = Field(0.01, ge=0, description="moe: weight of the Switch/Mixtral load-balancing loss")
    z_loss_coef: float = Field(0.001, ge=0, description="moe: weight of the router z-loss (ST-MoE)")

    @model_validator(mode="after")
    def _routing(self) -> "FFNConfig":
        if self.type == "moe" and self.top_k > self.num_experts:
            raise ValueError(f"ffn.top_k ({self.top_k}) exceeds ffn.num_experts ({self.num_experts})")
        return self


class NormConfig(_Strict):
    type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: float = Field(1e-5, gt=0)


class ModelConfig(_Strict):
    vocab_size: int = Field(32000, ge=2)
    d_model: int = Field(512, ge=1)
    num_layers: int = Field(6, ge=1)
    max_seq_len: int = Field(2048, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    parallel_layers: bool = False
    bias: bool = False
    init_std: float = Field(0.02, gt=0)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    positional: PositionalConfig = Field(default_factory=PositionalConfig)
    ffn: FFNConfig = Field(default_factory=FFNConfig)
    norm: NormConfig = Field(default_factory=NormConfig)

    @property
    def n_kv_heads(self) -> int:
        return self.attention.n_kv_heads or self.attention.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn.type == "moe" and self.ffn.expert_hidden_size:
            return self.ffn.expert_hidden_size
        if self.ffn.hidden_size:
            return self.ffn.hidden_size
        if self.ffn.type == "gelu":
            return 4 * self.d_model
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        heads = self.attention.n_heads
        if self.d_model % heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by attention.n_heads ({heads})")
        if heads % self.n_kv_heads:
            raise ValueError(f"attention.n_heads ({heads}) must be divisible by attention.n_kv_heads ({self.n_kv_heads})")
        if self.positional.type == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got d_model/n_heads = {self.head_dim}")
        return self

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """The ``model`` section of ``configs/<name>.yaml`` (seed 004: ``ModelConfig.from_preset("mac_mini")``)."""
        from training.presets import find_preset

        path = find_preset(name)
        model = read_config_file(path).get("model", {})
        try:
            return cls.model_validate(model)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{path}: model")) from None


class OptimizerConfig(_Strict):
    type: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    cpu_offload: bool = Field(False, description="AdamW state in host memory: FSDP2's CPUOffloadPolicy under FSDP, "
                              "else training/host_optimizer.py (adamw only)")

    @model_validator(mode="after")
    def _offload(self) -> "OptimizerConfig":
        if self.cpu_offload and self.type != "adamw":
            raise ValueError(f"cpu_offload: implemented for type adamw, not {self.type}")
        return self


class SchedulerConfig(_Strict):
    type: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    total_steps: int | None = Field(None, ge=1, description="Schedule length; None = num_steps")


class DistributedConfig(_Strict):
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = Field(600, ge=10, description="Collective timeout: a dead rank fails the group, never hangs it")
    save_timeout_s: int = Field(4 * 3600, ge=10, description="How long ranks wait for rank 0 to write a checkpoint (host group)")
    reshard_after_forward: bool = True
    fsdp_no_sync: bool = Field(False, description=(
        "FSDP2 with gradient accumulation: True keeps every parameter's unsharded float32 gradient across micro-steps and "
        "reduce-scatters once per step (less traffic, 4 bytes per parameter more on every GPU); False, torchtitan's way, "
        "reduce-scatters after every micro-step into the sharded gradients"))


class SFTConfig(_Strict):
    """Supervised fine-tuning (stages instruct, tool, reasoning; docs/finetune.md)."""

    packing: Literal["packed", "padded"] = Field(
        "packed", description="packed: examples laid end to end with per-example attention (doc_ids); padded: one per row")


SFT_STAGES = ("instruct", "tool", "reasoning")
SFT_LR = 1e-5  # seed 004's fine-tuning tips: lr 1e-5, warmup 3% of the steps (weight decay 0.1 and clip 1.0 are the defaults)
SFT_WARMUP_FRACTION = 0.03
PRETRAIN_SCHEDULE = ("optimizer.lr", "scheduler.warmup_steps")  # a pretraining config's; never an SFT stage's


def drop_pretraining_schedule(data: dict[str, Any], source: str, stage: str, notes: list[str]) -> dict[str, Any]:
    """``data`` without a pretraining config's ``optimizer.lr`` and ``scheduler.warmup_steps``.

    A fine-tuning stage built on a pretraining config (the pipeline's stages, or ``train
    pretrain.yaml stage=instruct``) would otherwise fine-tune at 6e-4 with 2000 warmup steps;
    removed, the stage takes seed 004's 1e-5 and 3% unless it is given its own values.
    """
    data = dict(data)
    for path in PRETRAIN_SCHEDULE:
        section, key = path.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node = data[section] = dict(node)  # the caller's dict stays as it was
            notes.append(f"{source}: {path}={node.pop(key)} is the pretraining value; stage {stage} uses its own "
                         f"(default {SFT_LR:g} and {SFT_WARMUP_FRACTION:.0%} warmup; set {stage}.{path}=... or {path}=... in the stage's config)")
    return data


class TrainConfig(_Strict):
    description: str = ""
    stage: Literal["pretrain", "instruct", "tool", "reasoning"] = Field(
        "pretrain", description="pretrain reads token shards; the others read canonical SFT .jsonl through tokenizer_path's chat template")
    train_data: str | list[str]
    val_data: str | list[str] | None = None
    tokenizer_path: str | None = None
    seq_len: int = Field(1024, ge=1)
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_steps: int = Field(10000, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    checkpoint_dir: str = "checkpoints"
    save_every: int = Field(1000, ge=1)
    save_every_minutes: float | None = Field(None, gt=0, description="Also checkpoint by wall-clock time")
    save_every_epoch: bool = Field(False, description="Also checkpoint at the first step after each pass over train_data (seed 004)")
    keep_last_n: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_steps: int = Field(50, ge=1)
    eval_only: bool = Field(False, description="Evaluate the (resumed) model once and exit without training")
    init_from: str = Field("scratch", min_length=1, description="scratch | resume | a podtrain checkpoint (weights only, "
                           "fresh optimizer) | a Hugging Face folder or hub id (Llama, GPT-2); see training/init.py")
    always_save_checkpoint: bool = Field(True, description="False: periodic checkpoints only when val loss improved")
    save_final: bool = Field(True, description="False: the last step is not written as `final` (benchmarks, bench/gpu_check.py)")
    use_wandb: bool = False
    wandb_project: str = "light-llm"
    wandb_run_name: str | None = None
    seed: int = 42
    num_workers: int = Field(4, ge=0, description="Batches prefetched by a background thread; 0 = none")
    compile_model: bool = False
    loss_kernel: Literal["chunked", "liger"] = Field(
        "chunked", description="chunked: training/loss.py's fused linear cross-entropy, no host sync; liger: liger-kernel's "
                               "Triton kernel on CUDA (the cuda extra), float32 accumulation, one host sync per micro-step")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager/eager capture the same graphs without code generation (debugging)")
    device: str = "auto"
    activation_checkpointing: bool = False
    auto_micro_batch: bool = Field(False, description="Keep batch_size x gradient_accumulation_steps sequences per rank per step "
                                   "and pick the largest micro-batch whose memory plan fits memory_budget_gb (training/memory_plan.py)")
    memory_budget_gb: float | None = Field(None, gt=0, description="GB per GPU for auto_micro_batch; default 80% of the GPU's memory")
    ac_every: int = Field(1, ge=1, description="With activation_checkpointing: checkpoint blocks 0, N, 2N, ... "
                          "(1 = every block; 2 = every other one: half the recompute, about twice the activations)")
    tensorboard_dir: str | None = None
    max_bad_steps: int = Field(5, ge=1, description="Consecutive non-finite steps that stop the run")
    preemption_grace_s: float = Field(25.0, gt=0, description="Seconds between SIGTERM and SIGKILL we may use")
    active_expert: int | None = Field(None, ge=0, description="Sequential expert run: train only this expert of each MoE layer")
    expert_checkpoint_dir: str | None = Field(None, description="Where sequential expert runs read and write expert_<i>.safetensors")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _sft_defaults(self) -> "TrainConfig":
        """An SFT stage takes seed 004's fine-tuning lr and warmup unless the config sets them."""
        if self.stage == "pretrain":  # an sft section is ignored (every saved config carries one)
            return self
        if not self.tokenizer_path:
            raise ValueError(f"tokenizer_path: stage {self.stage} needs the chat tokenizer bundle (orchestrate sft prepare writes it)")
        if "lr" not in self.optimizer.model_fields_set:
            self.optimizer.lr = SFT_LR
        if "warmup_steps" not in self.scheduler.model_fields_set:
            self.scheduler.warmup_steps = math.ceil(SFT_WARMUP_FRACTION * self.schedule_steps)
        return self

    @model_validator(mode="after")
    def _lengths(self) -> "TrainConfig":
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.eval_only and not self.val_data:
            raise ValueError("eval_only: needs val_data (the shards to evaluate on)")
        if self.active_expert is not None:
            if self.model.ffn.type != "moe":
                raise ValueError(f"active_expert needs model.ffn.type: moe (got {self.model.ffn.type})")
            if self.active_expert >= self.model.ffn.num_experts:
                raise ValueError(f"active_expert ({self.active_expert}) must be below model.ffn.num_experts ({self.model.ffn.num_experts})")
            if not self.expert_checkpoint_dir:
                raise ValueError("active_expert needs expert_checkpoint_dir (where expert_<i>.safetensors are kept)")
        return self

    @property
    def schedule_steps(self) -> int:
        return self.scheduler.total_steps or self.num_steps

    @property
    def resolved_tensorboard_dir(self) -> Path:
        return Path(self.tensorboard_dir) if self.tensorboard_dir else Path(self.checkpoint_dir) / "tensorboard"

    def to_plain(self) -> dict[str, Any]:
        """Every key with its resolved value, None dropped (TOML has no null)."""
        return _drop_none(self.model_dump(mode="json"))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, JSON or TOML file into a dict; errors name the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: unsupported config extension {suffix!r} (use .yaml, .yml, .json or .toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (key as typed, value parsed as a YAML scalar)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value (for example optimizer.lr=1e-3)")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key, raw


def _parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` -> each canonical dotted path with its value."""
    return canonical_key(*_split_override(item))


def apply_overrides(data: dict[str, Any], overrides: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict; values are parsed as YAML scalars.

    An alias (``learning_rate=1e-3``) sets its canonical key, so it overrides the file's value.
    """
    setters: dict[str, tuple[str, Any]] = {}  # canonical path -> (the override that set it, its value)
    for item in overrides:
        key, value = _split_override(item)
        if notes is not None and key in ALIASES:
            notes.append(describe(key, value))
        for path, path_value in canonical_key(key, value).items():
            _check_alias_clash(setters, path, item, path_value)
            node = data
            parts = path.split(".")
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"override {item!r}: {part} is not a section")
                node = child
            node[parts[-1]] = path_value
    return data


def _check_alias_clash(setters: dict[str, tuple[str, Any]], path: str, item: str, value: Any) -> None:
    """Two overrides naming one key, one of them through an alias (``n_layer=3 model.num_layers=2``),
    with different values: refused as in a file, instead of the later one silently winning."""
    earlier = setters.setdefault(path, (item, value))
    if earlier[0] == item or earlier[1] == value:
        return
    keys = [entry.partition("=")[0].strip() for entry in (earlier[0], item)]
    if any(k in ALIASES for k in keys):
        named = [f"{entry} ({ALIASES[k].origin} name)" if k in ALIASES else entry for k, entry in zip(keys, (earlier[0], item))]
        raise ConfigError(f"command line: {named[0]} and {named[1]} both set {path}, to different values; keep one")
    setters[path] = (item, value)


def format_validation_error(exc: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    """Render pydantic errors as one line: ``source: key.path: message; ...``.

    An error under a key set on the command line names that override, not the file.
    """
    by_path = {path: item for item in overrides or [] for path in _parse_override(item)}
    parts: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)) and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        origin = next((f"command line override {item}" for path, item in by_path.items()
                       if loc == path or loc.startswith(path + ".")), source)
        parts.append((origin, f"{loc}: {msg}" if loc else msg))
    if len({origin for origin, _ in parts}) == 1:
        return f"{parts[0][0]}: " + "; ".join(text for _, text in parts)
    return "; ".join(f"{origin}: {text}" for origin, text in parts)


def canonical_paths(override: str) -> tuple[str, ...]:
    """The dotted paths a ``key=value`` override sets (an alias's targets)."""
    return tuple(_parse_override(override))


def _stage_override(overrides: list[str]) -> Any:
    """The value of a ``stage=...`` override (the last one), or None."""
    found = None
    for item in overrides:
        found = _parse_override(item).get("stage", found)
    return found


def validate_config(data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None,
                    notes: list[str] | None = None) -> TrainConfig:
    """Rename aliases in ``data``, apply ``overrides``, validate; ``notes`` collects alias moves."""
    notes = notes if notes is not None else []
    try:
        data = rename_aliases(data, source, notes)
        stage = _stage_override(overrides or [])
        if stage in SFT_STAGES and data.get("stage", "pretrain") == "pretrain":  # a pretraining file made an SFT stage
            data = drop_pretraining_schedule(data, source, stage, notes)
        data = apply_overrides(data, overrides or [], notes)
        data = resolve_min_lr(data, OptimizerConfig.model_fields["lr"].default, notes)
    except AliasError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, overrides)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, notes: list[str] | None = None) -> TrainConfig:
    """Read ``path``, apply ``overrides``, validate. Relative data paths stay as written.

    A JSON preset of seed 000's shape is translated first (``training.presets.from_seed000``).
    """
    from training.presets import PresetError, from_seed000, is_seed000

    notes = notes if notes is not None else []
    data = read_config_file(path)
    if is_seed000(data):
        try:
            data = from_seed000(data, str(path), notes)
        except PresetError as exc:
            raise ConfigError(str(exc)) from None
    return validate_config(data, str(path), overrides, notes)


def dump_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML, JSON or TOML by the suffix of ``path``, atomically.

    Only keys that were set are written, so a default stays a default when the file is loaded
    again (the CPU float32 rule depends on whether ``dtype`` was given) and the file reads like
    the config a person wrote.
    """
    import tomli_w

    from training.atomic import atomic_write_text

    path = Path(path)
    plain = _drop_none(config.model_dump(mode="json", exclude_unset=True))
    suffix = path.suffix.lower()
    if suffix == ".toml":
        text = tomli_w.dumps(plain)
    elif suffix == ".json":
        text = json.dumps(plain, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(plain, sort_keys=False)
    else:
        raise ConfigError(f"{path}: unsupported config extension {suffix!r}")
    atomic_write_text(path, text)

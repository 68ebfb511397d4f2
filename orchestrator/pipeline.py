"""The whole pipeline as stages: layout → shard → (curate, when the recipe curates) → tokenizer → emit → train,
then, with ``--stages ...,instruct,tool,reasoning``, one stage per fine-tuning phase (orchestrator/sft/stages.py).

Each stage is a plain function over :class:`PipelineOptions` and the :class:`Layout`; the runner in
``orchestrator.stages`` decides, from completion markers, which ones need to run. Everything here
is callable from Python; ``orchestrator.cli`` is only argument parsing.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.tokenizer.encode import EncodeError, encode_shards
from orchestrator.experiment_config import PROJECT_ROOT, model_size, named_config
from orchestrator.launch import PipelineError, TrainingExit, launch_training, training_summary
from orchestrator.lock import ExperimentLock, LockHeld
from orchestrator.sft.stages import (
    StageContext, check_sft_inputs, finished, run_sft_stage, sft_stage_inputs, split_overrides, stage_dir,
)
from orchestrator.stages import STAGE_NAMES, Stage, StageRecord, run_stages
from orchestrator.tokenizer.bpe import check_tokenizer_choice, prepare_tokenizer
from orchestrator.workspace import HF_CACHE_VARIABLES, Layout, LayoutError
from sharder.errors import ShardError, ShardInterrupted
from sharder.manifest import ManifestError, load_manifest
from sharder.pipeline import ShardOptions, run_shard
from training.checkpoint_tags import list_tags
from training.config import ConfigError, TrainConfig, dump_config, load_config, read_config_file, validate_config
from training.token_shards import TOKEN_SUFFIX, TokenShardError, read_header
from training.tokenizer_bundle import META_FILE, TOKENIZER_FILE, TokenizerBundle, TokenizerError

DEFAULT_CONFIG = {"cloud": "configs/runpod_1b.yaml", "local": "configs/m3_medium.yaml"}
LOCK_FILE = ".orchestrate.lock"


@dataclass
class PipelineOptions:
    mode: str = "local"
    inputs: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    experiment: str | None = None
    train_shard_lines: int = 250_000
    # False: reuse the shard folders as they are (--reuse-shards, RUN_SHARD=0); None (RUN_SHARD=auto):
    # shard when there are inputs (or a recipe), else reuse the experiment's shards when it has some
    shard: bool | None = True
    tokenizer_json: str | None = None
    config: str | None = None
    workspace: Path | None = None
    stop_after: str = "train"
    overrides: list[str] = field(default_factory=list)
    val_ratio: float = 0.01
    take: int | None = None
    gzip: bool = False
    text_field: str = "text"
    tokenizer_sample_bytes: int = 2_000_000_000
    nproc: int | None = None  # training processes; None: one per visible GPU (torch.cuda.device_count())
    data: str | None = None  # a data recipe file (--data): replaces --input
    dataset_limit: str | None = None  # --dataset-limit name=N,...: documents per recipe source
    stages: list[str] = field(default_factory=lambda: ["pretrain"])  # --stages: pretrain and/or the SFT stages

    def config_path(self) -> Path:
        """``--config`` (RUN_CONFIG); without it the config an experiment is named after
        (``runpod-2b`` -> ``configs/runpod_2b.yaml``) when there is one, else the mode's default."""
        raw = Path(self.config or named_config(self.experiment) or DEFAULT_CONFIG[self.mode])
        if not raw.is_absolute() and not raw.exists() and (PROJECT_ROOT / raw).exists():
            return PROJECT_ROOT / raw
        return raw

    def config_note(self) -> str | None:
        """One line when the experiment's name and the config disagree in size, saying which config runs."""
        if not self.experiment:
            return None
        named, used = model_size(self.experiment), model_size(self.config_path().stem)
        if named is None or used is None or named == used:
            return None
        return (f"experiment {self.experiment} is named for a {named} model but config {self.config_path()} ({used}) "
                f"is the one that runs; pass --config configs/runpod_{named.lower()}.yaml (RUN_CONFIG) for the {named} model")

    def experiment_name(self) -> str:
        return self.experiment or self.config_path().stem.replace("_", "-")


def _hf_spec(item: str) -> tuple[str, str | None]:
    """``hf:owner/name[/config]`` -> (dataset, config)."""
    parts = item[3:].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise PipelineError(f"--input {item}: expected hf:OWNER/DATASET[/CONFIG], e.g. hf:HuggingFaceFW/fineweb/sample-10BT")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _input_identity(items: list[str], flag: str) -> list[Any]:
    """What identifies the inputs without reading them: names, sizes and mtimes of local files."""
    found: list[Any] = []
    for item in items:
        if item.startswith("hf:"):
            found.append(item)
            continue
        paths = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not paths or not all(Path(p).exists() for p in paths):
            raise PipelineError(f"{flag} {item}: no such file")
        for p in paths:
            files = sorted(x for x in Path(p).rglob("*") if x.is_file()) if Path(p).is_dir() else [Path(p)]
            found.extend((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return found


def _shard_options(opts: PipelineOptions, layout: Layout, items: list[str], mode: str, split: str, overwrite: bool) -> ShardOptions:
    hub = [i for i in items if i.startswith("hf:")]
    if hub and len(items) > 1:
        raise PipelineError("--input: an hf: dataset cannot be mixed with other inputs in one run")
    common = dict(mode=mode, split=split, lines_per_shard=opts.train_shard_lines, val_ratio=opts.val_ratio, take=opts.take,
                  gzip=opts.gzip, text_field=opts.text_field, experiment=layout.experiment, workspace=layout.root,
                  overwrite=overwrite)
    if opts.data is not None:
        return ShardOptions(data=opts.data, dataset_limit=opts.dataset_limit, **{**common, "text_field": "text"})
    if hub:
        dataset, name = _hf_spec(hub[0])
        return ShardOptions(dataset=dataset, name=name, source_label=f"--input {hub[0]}", **common)
    return ShardOptions(input=items, **common)


def _manifest_fp(directory: Path) -> str | None:
    try:
        return load_manifest(directory).fingerprint()
    except ManifestError:
        return None


def _has_shards(directory: Path) -> bool:
    try:
        return bool(load_manifest(directory).shards)
    except ManifestError:
        return False


def token_shard_report(directory: Path) -> tuple[int, list[str]]:
    """(total tokens, listing) of the token shards in ``directory``."""
    total, listing = 0, []
    for path in sorted(directory.glob(f"*{TOKEN_SUFFIX}")) if directory.is_dir() else []:
        try:
            n = read_header(path).num_tokens
        except TokenShardError as exc:
            listing.append(f"    {path.name}: BROKEN ({exc})")
            continue
        total += n
        listing.append(f"    {path.name}: {n:,} tokens")
    return total, listing


def check_token_dirs(cfg: TrainConfig) -> None:
    """Before launch: every configured shard path exists and holds tokens, or abort with a listing."""
    problems = []
    for key, value in (("train_data", cfg.train_data), ("val_data", cfg.val_data)):
        for item in ([value] if isinstance(value, str) else value or []):
            path = Path(item)
            total, listing = token_shard_report(path)
            if total == 0:
                others = [f"    {p.name}" for p in sorted(path.iterdir()) if not p.name.endswith(TOKEN_SUFFIX)] if path.is_dir() else []
                there = "\n".join(listing + others) or ("    (directory is empty)" if path.is_dir() else "    (does not exist)")
                problems.append(f"  {key}: expected token shards (*{TOKEN_SUFFIX}) with tokens in {path}; found:\n{there}")
    if problems:
        raise PipelineError("missing or empty shards, not launching:\n" + "\n".join(problems))


def _load_recipe(opts: PipelineOptions) -> Any:
    """The --data recipe, checked before any stage (None without --data)."""
    if opts.data is None:
        if opts.dataset_limit is not None:
            raise PipelineError("--dataset-limit: budgets recipe sources by name; give the recipe with --data")
        return None
    if opts.inputs or opts.validation:
        raise PipelineError("--data and --input/--validation are exclusive: a recipe names its own sources")
    from sharder.recipe import load_recipe

    try:
        return load_recipe(opts.data, opts.dataset_limit)
    except ShardError as exc:
        raise PipelineError(str(exc)) from None


class Pipeline:
    """Builds the stage list for one invocation; ``run()`` executes or plans it."""

    def __init__(self, opts: PipelineOptions, console: Console | None = None) -> None:
        if opts.stop_after not in STAGE_NAMES:
            raise PipelineError(f"--stop-after {opts.stop_after!r}: expected one of {', '.join(STAGE_NAMES)}")
        if opts.train_shard_lines < 1:
            raise PipelineError(f"--train-shard-lines {opts.train_shard_lines}: must be at least 1")
        self.opts = opts
        self.console = console or Console(highlight=False, soft_wrap=True)
        try:
            self.layout = Layout.for_mode(opts.mode, opts.experiment_name(), opts.workspace)
        except LayoutError as exc:
            raise PipelineError(str(exc)) from None
        self.config_path = opts.config_path()
        self.overrides, _ = split_overrides(opts.overrides)  # instruct.key=value and the like: for that stage only
        try:
            self.base_config = load_config(self.config_path, self.overrides)  # fail fast, before any stage
        except ConfigError as exc:
            raise PipelineError(str(exc)) from None
        self.recipe = _load_recipe(opts)
        if opts.shard is None:  # auto: a copy, so the caller's options keep saying auto
            self.opts = opts = replace(opts, shard=bool(opts.inputs or opts.data) or not _has_shards(self.layout.train_text))
        self.pretrain = "pretrain" in opts.stages
        if self.pretrain and opts.shard and not opts.inputs and self.recipe is None:
            raise PipelineError("--input: required to shard (or pass --reuse-shards / RUN_SHARD=0 to use existing shards)")
        self.input_ids = _input_identity(opts.inputs, "--input") if opts.shard else []
        if self.recipe is not None:
            self.input_ids = [{"recipe": self.recipe.fingerprint()}]
        self.validation_ids = _input_identity(opts.validation, "--validation") if opts.shard else []
        self._check_before_any_work()

    def _check_before_any_work(self) -> None:
        """What later stages would refuse, checked now (docs/data.md: "checked before any work"): the
        recipe's local sources and curate settings, the tokenizer choice against model.vocab_size,
        and the SFT stages' prepared files and vocabulary overrides."""
        o = self.opts
        if self.recipe is not None and self.pretrain:
            from sharder.curate.run import check_curate
            from sharder.mix import check_local_sources

            try:
                if o.shard:
                    check_local_sources(self.recipe)
                if self.recipe.curate is not None and self.recipe.curate.active:
                    check_curate(self.recipe.curate)
            except ShardError as exc:
                message = str(exc)
                raise PipelineError(message if message.startswith("--data") else f"--data {self.recipe.path}: {message}") from None
        if self.pretrain and STAGE_NAMES.index(o.stop_after) >= STAGE_NAMES.index("tokenizer"):
            try:
                tokenizer_json = self.tokenizer_json()
                check_tokenizer_choice(Path(tokenizer_json) if tokenizer_json else None, self.base_config.model.vocab_size)
            except TokenizerError as exc:
                raise PipelineError(f"{exc} (model.vocab_size of {self.config_path})") from None
        check_sft_inputs(self.layout, o.stages, o.overrides)

    # -- stages -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        L, o = self.layout, self.opts
        shard_inputs = ({"inputs": self.input_ids, "validation": self.validation_ids, "lines": o.train_shard_lines,
                         "val_ratio": o.val_ratio, "take": o.take, "gzip": o.gzip, "text_field": o.text_field}
                        if o.shard else {"reuse": [_manifest_fp(L.train_text), _manifest_fp(L.val_text)]})
        curate = self.recipe.curate if self.recipe is not None and self.recipe.curate and self.recipe.curate.active else None
        curate_inputs = {"shards": shard_inputs, "curate": curate.model_dump() if curate else None}
        tok_inputs = {"shards": curate_inputs if curate else shard_inputs, "vocab_size": self.base_config.model.vocab_size,
                      "tokenizer_json": o.tokenizer_json, "sample_bytes": o.tokenizer_sample_bytes}
        emit_inputs = {"tokenizer": tok_inputs, "config": self.config_path.read_text(encoding="utf-8"),
                       "overrides": o.overrides, "root": str(L.root)}
        all_stages = [
            Stage("layout", {"root": str(L.root), "experiment": L.experiment}, self.layout_stage,
                  lambda: all(d.is_dir() for d in L.directories()), plan=f"create {L.root}/{{datasets,artifacts,cache,runs,hf_cache}}"),
            Stage("shard", shard_inputs, self.shard_stage, lambda: _has_shards(L.train_text),
                  plan=(f"shard {', '.join(o.inputs)} -> {L.train_text}, {L.val_text}" if o.shard else f"reuse shards in {L.train_text}")),
            Stage("curate", curate_inputs, self.curate_stage, lambda: _has_shards(self.text_dirs()[0]),
                  plan=f"dedup/filter {L.train_text} -> {self.text_dirs()[0]}"),
            Stage("tokenizer", tok_inputs, self.tokenizer_stage,
                  lambda: (L.tokenizer / META_FILE).exists() and token_shard_report(L.train_tokens)[0] > 0,
                  plan=f"train or reuse {L.tokenizer}; encode -> {L.train_tokens}"),
            Stage("emit", emit_inputs, self.emit_stage,
                  lambda: (L.run / "training.yaml").exists() and (L.run / "training.toml").exists(),
                  plan=f"{self.config_path} -> {L.run / 'training.yaml'}, training.toml"),
            Stage("train", {"emit": emit_inputs}, self.train_stage, self._training_finished,
                  plan=f"train --resume auto -> {L.run / 'checkpoints'}"),
        ]
        last = STAGE_NAMES.index(o.stop_after)
        # the curate stage exists only when the recipe curates: runs without one keep their stage list
        chosen = [s for s in all_stages if STAGE_NAMES.index(s.name) <= last and (s.name != "curate" or curate)]
        if not self.pretrain:
            chosen = [s for s in chosen if s.name == "layout"]
        previous, previous_inputs = "pretrain", {"emit": emit_inputs} if self.pretrain else {"pretrained": str(L.run / "checkpoints")}
        sft_ctx = StageContext(L, self.config_path, o.overrides, o.nproc, self.console)
        for name in (s for s in o.stages if s != "pretrain"):
            inputs = sft_stage_inputs(sft_ctx, name, previous_inputs)
            run_dir = stage_dir(L, name)
            chosen.append(Stage(name, inputs, lambda changed, n=name, p=previous: run_sft_stage(sft_ctx, n, p),
                                lambda d=run_dir: finished(d / "checkpoints", d / "training.yaml"),
                                plan=f"{previous} final -> {name}: train {run_dir / 'training.yaml'} -> {run_dir / 'checkpoints'}"))
            previous, previous_inputs = name, inputs
        return chosen

    def layout_stage(self, changed: bool) -> dict[str, Any]:
        made = self.layout.create()
        hf = {key: os.environ[key] for key in HF_CACHE_VARIABLES}  # run() pointed them into the workspace
        return {"result": f"{len(made)} directories created", "hf": hf}

    def shard_stage(self, changed: bool) -> dict[str, Any]:
        L, o = self.layout, self.opts
        if not o.shard:
            if not _has_shards(L.train_text):
                raise PipelineError(f"--reuse-shards: no shards in {L.train_text} (run with --input, or RUN_SHARD=1)")
            return {"result": f"reused {len(load_manifest(L.train_text).shards)} train shards"}
        overwrite = changed
        if overwrite:
            self.console.print("[stage] shard: inputs changed since the last run; re-sharding from scratch", markup=False)
        runs = ([_shard_options(o, L, o.inputs, "prod", "train", overwrite), _shard_options(o, L, o.validation, "prod", "val", overwrite)]
                if o.validation else [_shard_options(o, L, o.inputs, "split", "train", overwrite)])
        docs = secs = mb = 0.0
        for options in runs:
            result = run_shard(options, console=self.console)
            for split in result.splits.values():
                docs += split.new_documents
                mb += split.new_text_bytes / 1e6
            secs += result.seconds
        return {"documents": docs, "seconds": secs,
                "throughput": f"{docs / secs:,.0f} docs/s, {mb / secs:.1f} MB/s" if secs and docs else "shards up to date"}

    def text_dirs(self) -> tuple[Path, Path]:
        """The text shards the tokenizer reads: the curated ones when the recipe curates."""
        L = self.layout
        if self.recipe is None or self.recipe.curate is None or not self.recipe.curate.active:
            return L.train_text, L.val_text
        curated = L.root / "datasets" / "curated"
        return curated / "train" / L.experiment, curated / "val" / L.experiment

    def curate_stage(self, changed: bool) -> dict[str, Any]:
        from sharder.curate.run import run_curate

        L = self.layout
        train, val = self.text_dirs()
        summary = run_curate(L.train_text, train, self.recipe.curate, self.console)
        if _has_shards(L.val_text):
            run_curate(L.val_text, val, self.recipe.curate, self.console)
        return {"result": f"{summary['input']:,} -> {summary['output']:,} train documents", "throughput": summary["throughput"]}

    def tokenizer_json(self) -> str | None:
        """The tokenizer.json to import: --tokenizer-json, or one placed by hand in the bundle folder (seed layout)."""
        L = self.layout
        if self.opts.tokenizer_json is None and (L.tokenizer / TOKENIZER_FILE).exists() and not (L.tokenizer / META_FILE).exists():
            return str(L.tokenizer / TOKENIZER_FILE)
        return self.opts.tokenizer_json

    def tokenizer_stage(self, changed: bool) -> dict[str, Any]:
        L, o = self.layout, self.opts
        train_text, val_text = self.text_dirs()
        tokenizer_json = self.tokenizer_json()
        if tokenizer_json is not None and o.tokenizer_json is None:
            self.console.print(f"[stage] tokenizer: importing the tokenizer.json found in {L.tokenizer}", markup=False)
        if changed and tokenizer_json is None and (L.tokenizer / META_FILE).exists():
            aside = L.tokenizer.with_name(L.tokenizer.name + ".previous")
            shutil.rmtree(aside, ignore_errors=True)
            L.tokenizer.rename(aside)
            self.console.print(f"[stage] tokenizer: shards or settings changed; retraining (previous bundle kept at {aside})", markup=False)
        bundle, status = prepare_tokenizer([train_text], L.tokenizer, self.base_config.model.vocab_size,
                                           tokenizer_json=Path(tokenizer_json) if tokenizer_json else None,
                                           sample_bytes=o.tokenizer_sample_bytes, console=self.console)
        results = [encode_shards(train_text, L.train_tokens, bundle, console=self.console)]
        if _has_shards(val_text):
            results.append(encode_shards(val_text, L.val_tokens, bundle, console=self.console))
        tokens = sum(r.tokens for r in results)
        secs = sum(r.seconds for r in results)
        return {"tokenizer": status, "vocab_size": bundle.vocab_size, "tokens": tokens,
                "throughput": f"tokenizer {status}; {tokens / secs:,.0f} tokens/s" if secs and tokens else f"tokenizer {status}; shards up to date"}

    def emitted_config(self) -> TrainConfig:
        """The base config with every workspace path filled in, then the user's key=value overrides."""
        L = self.layout
        data = read_config_file(self.config_path)
        data.update({
            "train_data": str(L.train_tokens),
            "val_data": str(L.val_tokens) if token_shard_report(L.val_tokens)[0] > 0 else None,
            "tokenizer_path": str(L.tokenizer),
            "checkpoint_dir": str(L.run / "checkpoints"),
            "tensorboard_dir": str(L.run / "tensorboard"),
        })
        if data["val_data"] is None:
            del data["val_data"]
        return validate_config(data, str(self.config_path), self.overrides)

    def emit_stage(self, changed: bool) -> dict[str, Any]:
        L = self.layout
        cfg = self.emitted_config()
        bundle = TokenizerBundle.load(L.tokenizer)
        if bundle.vocab_size > cfg.model.vocab_size:
            raise PipelineError(f"{self.config_path}: model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                f"{bundle.vocab_size} ids ({L.tokenizer})")
        check_token_dirs(cfg)
        for name in ("training.yaml", "training.toml"):
            dump_config(cfg, L.run / name)
            if load_config(L.run / name) != cfg:  # the promise: both files load back to the same config
                raise PipelineError(f"{L.run / name}: does not load back to the emitted config")
        return {"result": f"{L.run / 'training.yaml'}, training.toml", "train_data": str(cfg.train_data)}

    def _training_finished(self) -> bool:
        tags = list_tags(self.layout.run / "checkpoints")
        try:
            target = load_config(self.layout.run / "training.yaml").num_steps
        except ConfigError:
            return False
        return any(tag == "final" and step >= target for step, tag in tags)

    def train_stage(self, changed: bool) -> dict[str, Any]:
        cfg = load_config(self.layout.run / "training.yaml")
        check_token_dirs(cfg)
        code = launch_training(self.layout.run / "training.yaml", self.opts.nproc, self.console)
        if code != 0:
            raise TrainingExit(code)
        return training_summary(cfg)

    def run(self, dry_run: bool = False) -> list[StageRecord]:
        if dry_run:
            return run_stages(self.stages(), self.layout.stages, self.console, dry_run=True, user_errors=USER_ERRORS)
        with self.lock():
            before = {key: os.environ.get(key) for key in HF_CACHE_VARIABLES}
            for key, value in self.layout.apply_hf_environment(enforce=self.opts.mode == "cloud").items():
                if before[key] not in (None, value):
                    self.console.print(f"[stage] layout: {key}={before[key]} replaced by {value}: cloud mode keeps the "
                                       "Hugging Face caches on the workspace volume", markup=False)
            return run_stages(self.stages(), self.layout.stages, self.console, user_errors=USER_ERRORS)

    def lock(self) -> ExperimentLock:
        """This experiment's lock, taken: the first write to the workspace, so an unwritable one fails here."""
        lock = ExperimentLock(self.layout.run / LOCK_FILE)
        try:
            return lock.acquire()
        except LockHeld as exc:
            raise PipelineError(str(exc)) from None
        except OSError as exc:
            raise PipelineError(self.layout.unwritable(exc, self.opts.workspace is not None)) from None


USER_ERRORS: tuple[type[BaseException], ...] = (
    PipelineError, LayoutError, ShardError, ShardInterrupted, TokenizerError, EncodeError, ConfigError, ManifestError, TrainingExit,
)

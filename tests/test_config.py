"""The config schema: every format loads to the same object, errors name file and key path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tomli_w
import yaml

from training.config import ConfigError, TrainConfig, dump_config, load_config

BASE = {"train_data": "data/train", "model": {"d_model": 128, "num_layers": 2, "attention": {"n_heads": 4}}}


def test_seed_defaults_are_the_documented_ones() -> None:
    cfg = TrainConfig(train_data="x")
    assert (cfg.seq_len, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.num_steps) == (1024, 32, 1, 10000)
    assert (cfg.dtype, cfg.checkpoint_dir, cfg.save_every, cfg.keep_last_n) == ("bfloat16", "checkpoints", 1000, 3)
    assert (cfg.log_every, cfg.eval_every, cfg.eval_steps, cfg.seed, cfg.num_workers) == (10, 500, 50, 42, 4)
    assert (cfg.use_wandb, cfg.wandb_project, cfg.compile_model, cfg.device) == (False, "light-llm", False, "auto")
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.num_layers, m.max_seq_len, m.dropout, m.tie_embeddings, m.parallel_layers) == (
        32000, 512, 6, 2048, 0.0, True, False)
    o = cfg.optimizer
    assert (o.type, o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.grad_clip) == ("adamw", 3e-4, 0.1, 0.9, 0.95, 1e-8, 1.0)
    s = cfg.scheduler
    assert (s.type, s.warmup_steps, s.min_lr_ratio) == ("cosine", 100, 0.1)
    assert (m.norm.type, m.positional.type, m.ffn.type, m.bias) == ("rmsnorm", "rope", "swiglu", False)
    assert cfg.resolved_tensorboard_dir.as_posix() == "checkpoints/tensorboard"


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_every_format_loads_to_the_same_config(tmp_path, suffix) -> None:
    path = tmp_path / f"c{suffix}"
    text = {".yaml": yaml.safe_dump, ".json": json.dumps, ".toml": tomli_w.dumps}[suffix](BASE)
    path.write_text(text)
    assert load_config(path) == TrainConfig.model_validate(BASE)


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_dump_round_trips(tmp_path, suffix) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["optimizer.lr=1e-3", "scheduler.type=wsd"])
    dump_config(cfg, tmp_path / f"out{suffix}")
    assert load_config(tmp_path / f"out{suffix}") == cfg


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_overrides_are_typed_by_the_schema(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["optimizer.lr=1e-3", "model.num_layers=4", "compile_model=true",
                                               "train_data=[a, b]", "model.attention.n_kv_heads=2"])
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.num_layers == 4 and cfg.compile_model is True
    assert cfg.train_data == ["a", "b"] and cfg.model.n_kv_heads == 2


@pytest.mark.parametrize("data, override, expected", [
    ({**BASE, "optimiser": {}}, None, "optimiser: unknown key"),
    (BASE, "model.attention.n_head=4", "model.attention.n_head: unknown key"),
    (BASE, "optimizer.lr=fast", "optimizer.lr: Input should be a valid number"),
    (BASE, "scheduler.type=exp", "scheduler.type: Input should be 'cosine', 'linear', 'constant' or 'wsd'"),
    ({k: v for k, v in BASE.items() if k != "train_data"}, None, "train_data: Field required"),
    (BASE, "model.d_model=130", "d_model (130) must be divisible by attention.n_heads (4)"),
    (BASE, "seq_len=4096", "seq_len (4096) exceeds model.max_seq_len (2048)"),
    (BASE, "lr", "override 'lr': expected key=value"),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, data, override, expected) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    message = str(err.value)
    assert "\n" not in message and expected in message
    if not override or "=" in override:  # a key set on the command line is blamed on the command line
        key = (override or "").partition("=")[0]
        assert message.startswith(f"command line override {override}: " if key and expected.startswith(key + ":") else path)


def test_unparseable_and_unknown_files(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unsupported config extension '.ini'"):
        load_config(tmp_path / "x.ini")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path) -> None:
    path = _write(tmp_path, BASE)
    proc = subprocess.run([sys.executable, "-m", "training", path, "optimizer.beta3=0.9", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train: error: command line override optimizer.beta3=0.9: optimizer.beta3: unknown key"

"""A fine-tuning stage runs on the pretraining loop: seed-004 defaults, exact resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_support import make_chat_bundle, tiny_model_config
from training.config import ConfigError, validate_config
from training.sft.template import ChatTokenizer
from training.trainer import train


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> ChatTokenizer:
    return make_chat_bundle(tmp_path_factory.mktemp("chat"))


def _config(chat: ChatTokenizer, root: Path, **extra) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "instruct.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i % 9 + 1)))}) + "\n"
                            for i in range(60)))
    return {"stage": "instruct", "train_data": str(data), "val_data": str(data), "tokenizer_path": str(chat.directory),
            "seq_len": 64, "batch_size": 4, "num_steps": 8, "checkpoint_dir": str(root / "ckpt"), "save_every": 4,
            "log_every": 1, "eval_every": 4, "eval_steps": 2, "num_workers": 1, "device": "cpu",
            "model": tiny_model_config(chat.vocab_size), **extra}


def test_seed004_defaults_apply_to_sft_stages_only(chat: ChatTokenizer, tmp_path: Path) -> None:
    cfg = validate_config(_config(chat, tmp_path, num_steps=1000))
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == (1e-5, 30, 0.1, 1.0)
    assert cfg.sft.packing == "packed"
    own = validate_config(_config(chat, tmp_path, optimizer={"lr": 2e-5}, scheduler={"warmup_steps": 7}))
    assert (own.optimizer.lr, own.scheduler.warmup_steps) == (2e-5, 7)
    pretrain = validate_config({"train_data": "x"})
    assert pretrain.optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="tokenizer_path: stage tool needs the chat tokenizer bundle"):
        validate_config({"train_data": "x.jsonl", "stage": "tool"})


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_an_interrupted_stage_resumes_on_the_same_loss_curve(chat: ChatTokenizer, tmp_path: Path, packing: str) -> None:
    first = train(validate_config(_config(chat, tmp_path / "b", sft={"packing": packing}, optimizer={"lr": 1e-3}, num_steps=4,
                                          scheduler={"total_steps": 8, "warmup_steps": 1})))
    assert first.step == 4
    rest = train(validate_config(_config(chat, tmp_path / "b", sft={"packing": packing}, optimizer={"lr": 1e-3},
                                         scheduler={"total_steps": 8, "warmup_steps": 1})), resume="auto")
    whole_same = train(validate_config(_config(chat, tmp_path / "c", sft={"packing": packing}, optimizer={"lr": 1e-3},
                                               scheduler={"total_steps": 8, "warmup_steps": 1})))
    assert whole_same.exit_code == 0 and len(whole_same.losses) == 8 and 8 in whole_same.val_losses
    for step in (5, 6, 7, 8):
        assert abs(rest.losses[step] - whole_same.losses[step]) < 1e-6, step


def test_a_chat_vocabulary_larger_than_the_model_is_one_line(chat: ChatTokenizer, tmp_path: Path) -> None:
    cfg = validate_config(_config(chat, tmp_path, model=tiny_model_config(chat.vocab_size - 1)))
    with pytest.raises(ValueError, match=r"model.vocab_size=518 is smaller than the chat tokenizer's 519 ids"):
        train(cfg)


def test_sft_init_resizes_the_embedding_with_mean_rows_and_a_stage_starts_from_it(chat: ChatTokenizer, tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from orchestrator.sft.cli import app
    from training import checkpoint as ckpt
    from training.config import ModelConfig
    from training.model import Transformer

    base_vocab = chat.vocab_size - len(chat.ids)
    model = Transformer(ModelConfig(**tiny_model_config(base_vocab)))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = validate_config({"train_data": "x", "seq_len": 64, "model": tiny_model_config(base_vocab)}).to_plain()
    ckpt.write_snapshot(tmp_path / "pre", ckpt.Snapshot("final", 30, weights, {"step": 30, "format": ckpt.FORMAT}, config))
    result = CliRunner().invoke(app, ["init", "--tokenizer", str(chat.directory.parent / "base"),
                                      "--checkpoint", str(tmp_path / "pre" / "final"), "--out", str(tmp_path / "sft")])
    assert result.exit_code == 0, result.output
    resized = ckpt.load_tag(tmp_path / "sft" / "init", "final")
    emb, old = resized.weights["embed_tokens.weight"], weights["embed_tokens.weight"]
    assert emb.shape == (chat.vocab_size, old.shape[1]) and torch.equal(emb[:base_vocab], old)
    assert torch.allclose(emb[base_vocab:], old.mean(0).expand(len(chat.ids), -1))
    assert resized.config["model"]["vocab_size"] == chat.vocab_size
    cfg = _config(ChatTokenizer.load(tmp_path / "sft" / "tokenizer"), tmp_path / "run", num_steps=2,
                  init_from=str(tmp_path / "sft" / "init" / "final"))
    del cfg["model"]  # from the checkpoint
    assert train(validate_config(cfg)).step == 2
    run_ckpt = tmp_path / "run" / "ckpt"

    from transformers import AutoTokenizer

    from orchestrator.use_cli import app as use_app
    from training.generate import SamplingParams
    from training.inference import load_checkpoint
    from training.sft.chat import reply_ids

    exported = CliRunner().invoke(use_app, ["export", str(run_ckpt), "--to", "hf", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": "count to 3"}]
    assert list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)) == \
        chat.encode(messages, add_generation_prompt=True)[0]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == chat.end_id

    sampled = CliRunner().invoke(use_app, ["sample", str(run_ckpt), "--chat", "--system", "brief", "--prompt", "count to 3",
                                           "--temperature", "0", "--max-new-tokens", "8", "--json", str(tmp_path / "s.json")])
    assert sampled.exit_code == 0, sampled.output
    ids = json.loads((tmp_path / "s.json").read_text())["samples"][0]["ids"]
    model = load_checkpoint(str(run_ckpt), torch.device("cpu")).model
    assert ids == reply_ids(model, chat, messages, SamplingParams(8, temperature=0.0)) and chat.end_id not in ids


@pytest.mark.slow  # two torchrun launches
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_sft_stage_under_two_ranks_follows_one_process(chat: ChatTokenizer, tmp_path: Path, strategy: str) -> None:
    """Packed batches split by rank: the same rows as one process. The loss is per valid target over the
    whole step (all micro-batches, all ranks), so unequal target counts per rank give the one-process loss."""
    import subprocess
    import sys

    import yaml

    def run(out: Path, world: int) -> dict[int, float]:
        cfg = _config(chat, out, batch_size=4 // world, gradient_accumulation_steps=2, num_steps=4, num_workers=0,
                      optimizer={"lr": 1e-3}, distributed={"strategy": strategy if world > 1 else "none", "timeout_s": 60})
        path = out / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if world > 1 else [sys.executable]
        proc = subprocess.run([*launcher, "-m", "training", str(path)], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    for step in range(1, 5):
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])

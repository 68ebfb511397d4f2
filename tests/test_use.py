"""``orchestrate evaluate|sample|export`` on checkpoints the trainer wrote, checked against the trainer and ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config, write_byte_tokenizer
from orchestrator.use_cli import app
from training.config import validate_config
from training.generate import SamplingParams, generate, generate_uncached
from training.inference import load_checkpoint
from training.model import Transformer
from training.trainer import train

GPT2_STYLE = {"positional": {"type": "learned"}, "norm": {"type": "layernorm"}, "ffn": {"type": "gelu", "hidden_size": 128},
              "bias": True}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, byte_corpus, tmp_path_factory):
    """A 20-step run of each family, with a real (byte-level) tokenizer recorded in its config."""
    out = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(byte_corpus, out, num_steps=20, tokenizer_path=str(write_byte_tokenizer(out / "tokenizer")))
    if request.param == "gpt2":
        cfg["model"].update(GPT2_STYLE)
    result = train(validate_config(cfg))
    return out / "ckpt", result


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_evaluate_on_the_run_val_data_prints_the_trainer_last_val_loss(run, tmp_path) -> None:
    ckpt_dir, result = run
    out = invoke("evaluate", ckpt_dir / "final", "--json", tmp_path / "e.json")
    assert out.exit_code == 0, out.output
    row = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert abs(row["loss"] - result.val_losses[20]) <= 1e-4
    assert row["perplexity"] == pytest.approx(torch.tensor(row["loss"]).exp().item(), rel=1e-6)
    assert f"{row['loss']:.4f}" in out.output


def test_evaluate_on_text_files_tokenizes_them(run, tmp_path) -> None:
    ckpt_dir, _ = run
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": "def f(x):\n    return x + 1\n" * 8}) + "\n" for _ in range(6)))
    out = invoke("evaluate", ckpt_dir, "--data", tmp_path / "docs.jsonl", "--json", tmp_path / "e.json", "--seq-len", "32")
    assert out.exit_code == 0, out.output
    row = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert row["tokens"] == 32 * ((6 * (8 * 27 + 1) - 1) // 32) and 0 < row["loss"] < 6


def test_seed_003_plain_torch_loading_with_tied_embeddings(run) -> None:
    ckpt_dir, _ = run
    ck = load_checkpoint(str(ckpt_dir / "best"))
    assert ck.config.model.tie_embeddings and "lm_head.weight" not in load_file(str(ckpt_dir / "best.safetensors"))
    model = Transformer(ck.config.model)
    model.load_state_dict(load_file(str(ckpt_dir / "best.safetensors")))  # the seed's snippet, strict
    assert torch.equal(model.lm_head.weight, ck.model.embed_tokens.weight)


def test_kv_cache_sampling_gives_the_uncached_tokens(run) -> None:
    ck = load_checkpoint(str(run[0] / "final"))
    prompt = list(b"import os\n")
    for params in (SamplingParams(40, 0.0), SamplingParams(40, 1.0, top_k=20, top_p=0.9, seed=3)):
        assert generate(ck.model, prompt, params) == generate_uncached(ck.model, prompt, params)
    assert generate(ck.model, prompt, SamplingParams(40, 1.0, top_k=1)) == generate(ck.model, prompt, SamplingParams(40, 0.0))
    assert generate(ck.model, prompt, SamplingParams(40, 1.0, seed=1)) != generate(ck.model, prompt, SamplingParams(40, 1.0, seed=2))


def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt_dir, _ = run
    out = invoke("export", ckpt_dir / "final", "--to", "hf", tmp_path / "hf")
    assert out.exit_code == 0, out.output
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ck = load_checkpoint(str(ckpt_dir / "final"))
    prompt = "def main():\n    "
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(prompt.encode())
    with torch.no_grad():
        assert (hf(ids).logits - ck.model(ids)[0]).abs().max() <= 1e-4
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    sampled = invoke("sample", ckpt_dir / "final", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24",
                     "--json", tmp_path / "s.json")
    assert sampled.exit_code == 0, sampled.output
    assert json.loads((tmp_path / "s.json").read_text())["samples"][0]["ids"] == theirs


def test_a_prompt_file_gives_a_table(run, tmp_path) -> None:
    (tmp_path / "prompts.txt").write_text("import sys\\n\nclass Foo:\n")
    out = invoke("sample", run[0] / "final", "--prompt-file", tmp_path / "prompts.txt", "--max-new-tokens", "8", "--seed", "1")
    assert out.exit_code == 0, out.output
    assert "class Foo:" in out.output and "import sys" in out.output and "tokens/s, KV cache" in out.output


@pytest.mark.parametrize("args, message", [
    (["evaluate", "{tmp}/nowhere/final"], "evaluate: error: checkpoint {tmp}/nowhere/final: no such checkpoint or folder"),
    (["sample", "nowhere/final", "--prompt", "x"], "sample: error: checkpoint nowhere/final: no such checkpoint"),
    (["export", "{tmp}/nowhere", "--to", "hf", "{tmp}/o"], "export: error: checkpoint {tmp}/nowhere: no such checkpoint or folder"),
    (["evaluate", "{ckpt}/final", "--dataset-limit", "a=x"], "evaluate: error: --dataset-limit 'a=x': expected name=N"),
    (["export", "{ckpt}/final", "--to", "onnx", "{tmp}/o"], "export: error: --to 'onnx': the only export format is hf"),
])
def test_bad_inputs_are_one_line(run, tmp_path, args, message) -> None:
    fill = {"tmp": tmp_path, "ckpt": run[0]}
    out = invoke(*[a.format(**fill) for a in args])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill)), out.output


def test_dataset_limit_gives_one_row_per_recipe_source(run, tmp_path) -> None:
    import random
    import yaml

    rng = random.Random(0)
    (tmp_path / "py.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(self, x):\n    return x + {i}\n" * 4}) + "\n" for i in range(30)))
    (tmp_path / "noise.jsonl").write_text("".join(
        json.dumps({"text": "".join(rng.choice("~`^|@#$%&*") for _ in range(200))}) + "\n" for _ in range(30)))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"data": {"sources": [
        {"type": "files", "path": "py.jsonl", "name": "py"}, {"type": "files", "path": "noise.jsonl", "name": "noise"}]}}))
    out = invoke("evaluate", run[0] / "final", "--recipe", tmp_path / "r.yaml", "--dataset-limit", "py=10,noise=10",
                 "--seq-len", "32", "--json", tmp_path / "e.json")
    assert out.exit_code == 0, out.output
    rows = {r["data"]: r for r in json.loads((tmp_path / "e.json").read_text())["results"]}
    assert set(rows) == {"py", "noise"} and rows["noise"]["tokens"] == 32 * ((10 * 201 - 1) // 32)
    assert rows["py"]["loss"] < rows["noise"]["loss"]  # the model learned Python, not line noise
    unknown = invoke("evaluate", run[0] / "final", "--recipe", tmp_path / "r.yaml", "--dataset-limit", "web=5")
    assert unknown.exit_code == 2 and "unknown source 'web' (the recipe has: py, noise)" in unknown.output


def test_export_of_an_option_without_hf_equivalent_is_one_line(run, tmp_path) -> None:
    import shutil

    config = json.loads((run[0] / "final.config.json").read_text())
    config["model"]["parallel_layers"] = True
    (tmp_path / "p.config.json").write_text(json.dumps(config))
    shutil.copy(run[0] / "final.safetensors", tmp_path / "p.safetensors")
    out = invoke("export", tmp_path / "p", "--to", "hf", tmp_path / "o")
    assert out.exit_code == 2 and out.output.strip() == (
        "export: error: parallel_layers: true has no Hugging Face Llama/GPT-2 equivalent (attention and MLP in parallel)")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))

"""docs/coming-from.md, run: every podtrain line of its tables, in tiny form.

The table is parsed here, so the doc and the test cannot drift: a row's podtrain cell is what runs
(each backticked command in turn), with only these changes, the same for every row of a kind:

- a tiny model and 2 steps: ``key=value`` items after the line (before it for nanoGPT's lines, whose
  own values win there; the step count always comes last);
- a temporary working directory holding what the line reads: nanoGPT ``.bin`` files, token shards,
  a tokenizer, checkpoints made by the earlier lines of the same seed, ``configs/`` (the project's,
  with the seed 004 recipe pointed at local stand-ins of its hub datasets) and ``infra/`` (the pod
  manifest with a volume filled in);
- the hub offline: a hub-reading line gets a local source (``--input``, ``--file``), and RunPod is
  the fake API of tests/fake_runpod.py.

Rows without a podtrain command are in NOT_RUN with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import stdlib_documents, write_byte_shards
from fake_runpod import FakeRunPod
from test_recipes import _local_hub_folder

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "coming-from.md"
KEY = "rp-test-key-comingfrom"

NOT_RUN = {
    "002-3": "no command: TensorBoard is served on RunPod's HTTP proxy",
    "002-4": "no command: plain ssh through RunPod's gateway",
    "002-8": "reads the boot log over SSH from a running pod (tests/test_pods.py runs it with a fake ssh)",
    "004-1": "installs packages (make test does it)",
    "004-2": "no command needed: podtrain makes its folders",
}
# torchrun with two ranks; the whole pipeline; three stages in a row; the SFT chain (004-10 to 004-12: make test
# fine-tunes in tests/test_sft_train.py); seed 004's pretraining lines at seq_len 4096 (004-6, and 004-7 with its
# expert flags); nanoGPT's 6 x 384 model on GPT-2's vocabulary. `pytest -m slow tests/test_coming_from.py` runs them.
SLOW = {"000-1", "002-6", "004-6", "004-7", "004-14", "004-10", "004-11", "004-12", "001-3"}

PROGRAMS = {
    "train": [sys.executable, "-m", "training"],
    "orchestrate": [sys.executable, "-m", "orchestrator"],
    "fineweb-sharder": [sys.executable, "-m", "sharder"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone"],
}
TINY_NANOGPT = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "gradient_accumulation_steps=1",
                "eval_iters=1", "device=cpu", "dtype=float32", "compile=False"]
TINY_MODEL = ["model.d_model=32", "model.num_layers=1", "model.attention.n_heads=2", "model.attention.n_kv_heads=null",
              "model.ffn.hidden_size=64", "model.ffn.expert_hidden_size=32", "seq_len=32", "model.max_seq_len=32",
              "batch_size=2", "gradient_accumulation_steps=1", "eval_steps=1", "device=cpu", "dtype=float32", "num_workers=0",
              "compile_model=false", "activation_checkpointing=false"]
STEPS = ["num_steps=2", "save_every=1", "eval_every=2"]


def doc_rows() -> list[tuple[str, str, list[str]]]:
    """(id, the seed's line, the podtrain commands) of every table row of docs/coming-from.md."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d{3}-\d+", cells[0]):
            seed = re.findall(r"`([^`]+)`", cells[1])
            rows.append((cells[0], seed[0] if seed else "", re.findall(r"`([^`]+)`", cells[2])))
    return rows


ROWS = {row_id: commands for row_id, _, commands in doc_rows()}


def test_the_table_lists_every_seed_line_and_the_lists_here_match_it() -> None:
    seeds = sorted(p for up in (ROOT.parent, ROOT.parent.parent) for p in (up / "shared" / "seeds").glob("*.txt"))
    rows = doc_rows()
    assert len(rows) == len({r[0] for r in rows}) >= 30
    if seeds:  # the seed documents beside the project: every line quoted in the table is in them, as written
        text = "\n".join(" ".join(p.read_text(encoding="utf-8").replace("\\\n", " ").split()) for p in seeds)
        for row_id, seed_line, _ in rows:
            assert " ".join(seed_line.split()) in text, row_id
    assert {r for r, commands in ROWS.items() if not commands} <= set(NOT_RUN) <= set(ROWS)


# -- what the lines read -----------------------------------------------------------------------------------------------

def _configs(cwd: Path) -> None:
    """``configs/``: the project's files, and the seed 004 recipe with its four sources as local parquet folders."""
    (cwd / "configs" / "recipes").mkdir(parents=True)
    for path in (ROOT / "configs").glob("*.*"):
        (cwd / "configs" / path.name).symlink_to(path)
    shipped = yaml.safe_load((ROOT / "configs" / "sources.yaml").read_text())["sources"]
    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / "seed004.yaml").read_text())
    local = {name: {**shipped[name], "dataset": str(_local_hub_folder(cwd / "hub", name, shipped[name]))}
             for name in recipe["data"]["sources"]}
    (cwd / "configs" / "recipes" / "local_sources.yaml").write_text(yaml.safe_dump({"version": 1, "sources": local}))
    recipe["data"].update(registry="local_sources.yaml", min_text_length=1)
    (cwd / "configs" / "recipes" / "seed004.yaml").write_text(yaml.safe_dump(recipe))


def _corpus(cwd: Path) -> Path:
    path = cwd / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_documents(150_000)), encoding="utf-8")
    return path


def _byte_shards(cwd: Path) -> tuple[Path, Path]:
    docs = [d[:3000] for d in stdlib_documents(60_000)]
    write_byte_shards(cwd / "shards" / "train", docs[1:], 2)
    write_byte_shards(cwd / "shards" / "val", docs[:1], 1)
    return cwd / "shards" / "train", cwd / "shards" / "val"


def _nanogpt_bins(cwd: Path, dataset: str) -> None:
    data = cwd / "data" / dataset
    data.mkdir(parents=True)
    ids = np.frombuffer("".join(stdlib_documents(40_000)).encode(), dtype=np.uint8).astype(np.uint16)
    ids[: len(ids) // 10].tofile(data / "val.bin")
    ids[len(ids) // 10:].tofile(data / "train.bin")


def _run(cwd: Path, command: str, *, before: list[str] = (), after: list[str] = (), env: dict[str, str] | None = None,
         stdin: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    words = _tiny_words(command.split(), list(before), list(after))
    argv = [*PROGRAMS[words[0]], *words[1:]]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RUNPOD_"))}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HOME=str(cwd / "home"), WANDB_DIR=str(cwd),
                   OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(argv, cwd=cwd, env=environ, input=stdin, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _tiny_words(words: list[str], before: list[str], after: list[str]) -> list[str]:
    """``before`` + the line + ``after``, where podtrain refuses one key set twice: a ``before`` default the
    line sets itself is dropped (the line's value stays), an ``after`` item the line sets replaces it in place
    (``max_iters=100000`` becomes the 2 steps of the tiny form)."""
    from training.config import canonical_paths

    def paths(item: str) -> set[str]:
        return set(canonical_paths(item)) if "=" in item and not item.startswith("-") else set()

    line = list(words[1:])
    set_by_line = set().union(*(paths(w) for w in line)) if line else set()
    head = [item for item in before if not paths(item) & set_by_line]
    tail = []
    for item in after:
        hits = [i for i, w in enumerate(line) if paths(w) & paths(item)]
        if hits:
            line[hits[0]] = item
        else:
            tail.append(item)
    return [words[0], *head, *line, *tail]


def _tags(directory: Path) -> set[str]:
    return {p.name.split(".")[0] for p in directory.glob("*.safetensors")}


def _as_step(directory: Path, tag: str, step: int) -> None:
    """Hard-link checkpoint ``tag`` under the step tag a seed's line names (its contents keep their own step)."""
    for suffix in (".state.pt", ".config.json", ".safetensors"):
        os.link(directory / f"{tag}{suffix}", directory / f"step{step:07d}{suffix}")


# -- the seed 004 chain: raw text -> tokenizer -> token shards -> checkpoints --------------------------------------------

def _seed004_data(cwd: Path) -> None:
    """data/raw (text shards), checkpoints/tokenizer and data/processed/pretrain, as lines 004-3..004-5 make them."""
    _run(cwd, "fineweb-sharder --input corpus.jsonl --mode prod --output-dir data/raw")
    _run(cwd, "orchestrate tokenizer train --output checkpoints/tokenizer", after=["--vocab-size", "512"])
    _run(cwd, "orchestrate tokenizer encode --text-dir data/raw --out-dir data/processed/pretrain --bundle-dir checkpoints/tokenizer")


def _pretrained(cwd: Path, preset: str, run_dir: str) -> Path:
    _run(cwd, f"train --preset {preset} --tokenizer checkpoints/tokenizer --processed-dir data/processed/pretrain "
              f"--output-dir {run_dir} --disable-eval", after=[*TINY_MODEL, *STEPS])
    return cwd / run_dir


def _sft_files(cwd: Path) -> list[str]:
    rows = {"instruct": [{"instruction": f"count to {i}", "output": " ".join(map(str, range(i % 7 + 1)))} for i in range(20)],
            "tool": [{"user_message": f"weather in {c}?", "tool_calls": [{"name": "weather", "arguments": {"city": c}}],
                      "tool_results": [{"content": f"{c}: sunny"}], "assistant_response": f"Sunny in {c}."}
                     for c in ("Paris", "Oslo", "Rome")],
            "reasoning": [{"question": f"{a} + {b}?", "reasoning": f"{a} + {b} = {a + b}", "answer": str(a + b)}
                          for a in range(3) for b in range(3)]}
    flags = ["--no-hub"]
    for stage, records in rows.items():
        (cwd / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        flags += ["--file", f"{stage}={cwd / f'{stage}.jsonl'}"]
    return flags


# -- one test per row ---------------------------------------------------------------------------------------------------

def _params() -> list:
    params = []
    for row_id in ROWS:
        if row_id in NOT_RUN:
            continue
        marks = [pytest.mark.slow] if row_id in SLOW else []
        params.append(pytest.param(row_id, marks=marks, id=row_id))
    return params


@pytest.fixture(scope="module")
def seed004_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where lines 004-3..004-6 have run once (data/raw, checkpoints/tokenizer, data/processed/pretrain,
    a tiny mac_mini in checkpoints/pretrain); each later seed 004 row starts from a copy of it."""
    base = tmp_path_factory.mktemp("seed004")
    _configs(base)
    _corpus(base)
    _seed004_data(base)
    _pretrained(base, "mac_mini", "checkpoints/pretrain")
    return base


@pytest.mark.timeout(900)
@pytest.mark.parametrize("row_id", _params())
def test_the_podtrain_line_runs_in_tiny_form(row_id: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cwd = tmp_path
    commands = ROWS[row_id]
    seed = row_id.split("-")[0]
    if seed == "004" and row_id not in ("004-3", "004-4", "004-5"):
        shutil.copytree(request.getfixturevalue("seed004_base"), cwd, symlinks=True, dirs_exist_ok=True)
        _seed004_row(cwd, row_id, commands)
        return
    _configs(cwd)
    if seed == "000":
        train_dir, _ = _byte_shards(cwd)
        cache = cwd / "workspace" / "cache" / "tiny" / "tokens"
        cache.mkdir(parents=True)
        shutil.move(str(train_dir), cache / "train")
        (cwd / "configs" / "tiny.json").write_text(json.dumps({
            "name": "tiny", "description": "a seed 000 preset in tiny form",
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "seq_length": 32, "vocab_size": 257},
            "train": {"train_tokens": 2 * 2 * 32 * 2, "per_gpu_batch_size": 2, "accumulation_steps": 1, "lr": 0.001,
                      "num_workers": 0, "prefetch_factor": 1}}))
        proc = _run(cwd, commands[0], stdin="tiny\n")
        assert "Choose a training preset" in proc.stdout and (cwd / "workspace/runs/tiny/checkpoints/final.safetensors").exists()
    elif seed == "001":
        _nanogpt_bins(cwd, "openwebtext")
        proc = _run(cwd, commands[0], before=TINY_NANOGPT, after=STEPS)
        assert "no config given: nanoGPT's train.py defaults" in proc.stdout
        assert "final" in _tags(cwd / "out")
        if "wandb_log=True" in commands[0]:
            assert "warning: use_wandb: W&B did not start" in proc.stdout
    elif commands[0].startswith("orchestrate pod"):
        _pod_row(cwd, commands[0])
    elif row_id == "002-5":
        train_dir, val_dir = _byte_shards(cwd)
        _run(cwd, commands[0], after=[*TINY_MODEL, *STEPS, f"train_data={train_dir}", f"val_data={val_dir}",
                                      "model.vocab_size=257", "checkpoint_dir=ckpt"])
        assert "final" in _tags(cwd / "ckpt")
    elif row_id == "002-6":
        corpus = _corpus(cwd)
        line = commands[0].replace("/workspace/raw_corpus.txt", str(corpus))
        proc = _run(cwd, line, after=["--workspace", str(cwd / "ws"), "--nproc-per-node", "1", "--tokenizer-sample-gb", "0.001",
                                      *TINY_MODEL, *STEPS, "model.vocab_size=512", "dtype=float32"])
        assert re.search(r"experiment runpod-2b, workspace \S+, config \S*configs/runpod_2b\.yaml", proc.stdout), proc.stdout
        assert "final" in _tags(cwd / "ws" / "runs" / "runpod-2b" / "checkpoints")
    elif row_id == "002-7":
        _run(cwd, commands[0], after=["--input", str(_corpus(cwd)), "--take", "50"])
        assert list((cwd / "workspace" / "datasets" / "train" / "default").glob("shard_*.txt"))
    elif seed == "003":
        train_dir, val_dir = _byte_shards(cwd)
        data = [f"train_data={train_dir}", f"val_data={val_dir}", "model.vocab_size=257"]
        if "--resume" in commands[0]:
            _run(cwd, "train configs/small.yaml", after=[*TINY_MODEL, *STEPS, *data])
            _as_step(cwd / "checkpoints" / "small", "step0000001", 5000)
            proc = _run(cwd, commands[0], after=[*TINY_MODEL, *STEPS, *data, "num_steps=3"])
            assert f"resumed from {Path('checkpoints/small/step0005000')} at step 1" in proc.stdout
        else:
            _run(cwd, commands[0], after=[*TINY_MODEL, *STEPS, *data])
        assert "final" in _tags(cwd / "checkpoints" / "small")
    else:
        _seed004_row(cwd, row_id, commands)


def _pod_row(cwd: Path, command: str) -> None:
    manifest = yaml.safe_load((ROOT / "infra" / "runpod-pod.yaml").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    manifest["volumeMounts"][0]["volumeName"] = "vol9test42"  # the fake account's volume
    manifest["env"].update(RUN_REPO="https://example.org/podtrain.git", RUN_REF=head)
    (cwd / "infra").mkdir()
    (cwd / "infra" / "runpod-pod.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with FakeRunPod(KEY) as api:
        pod_id = api.add_pod()["id"] if "POD_ID" in command else ""
        env = {"RUNPOD_API_BASE_URL": api.url, "RUNPOD_API_KEY": KEY}
        proc = _run(cwd, command.replace("POD_ID", pod_id), env=env)
        assert KEY not in proc.stdout + proc.stderr
        if " create " in command:
            assert len(api.pods) == 1 and "Created pod" in proc.stdout, proc.stdout
        if " delete " in command:
            assert pod_id and api.pods == {}


def _seed004_row(cwd: Path, row_id: str, commands: list[str]) -> None:
    tiny = [*TINY_MODEL, *STEPS]
    if row_id in ("004-3", "004-5"):
        _corpus(cwd)
    if row_id == "004-3":
        _run(cwd, commands[0])
        assert json.loads((cwd / "data" / "raw" / "manifest.json").read_text())["totals"]
        return
    if row_id == "004-4":
        (cwd / "data" / "raw" / "a").mkdir(parents=True)
        (cwd / "data" / "raw" / "a" / "notes.txt").write_text("\n".join(stdlib_documents(200_000)))
        proc = _run(cwd, commands[0])
        assert "training on the files under data/raw/" in proc.stderr and (cwd / "checkpoints/tokenizer/tokenizer.json").exists()
        return
    if row_id == "004-5":
        _run(cwd, "fineweb-sharder --input corpus.jsonl --mode prod --output-dir data/raw")
        _run(cwd, "orchestrate tokenizer train --output checkpoints/tokenizer", after=["--vocab-size", "512"])
        _run(cwd, commands[0])
        assert list((cwd / "data" / "processed" / "pretrain").glob("*.tok"))
        return
    if row_id in ("004-6", "004-7"):
        _run(cwd, commands[0], after=[*tiny, "val_data=null"])
        run = "mac_mini_pretrain" if row_id == "004-6" else "expert75m_exp0"
        assert {"final", "latest"} <= _tags(cwd / "checkpoints" / "pretrain" / run)
        if row_id == "004-7":
            assert (cwd / "checkpoints" / "experts" / "expert_0.safetensors").exists()
    elif row_id == "004-8":
        _as_step(cwd / "checkpoints" / "pretrain", "step0000001", 1000)
        proc = _run(cwd, commands[0], after=[*tiny, "val_data=null", "num_steps=3", "train_data=data/processed/pretrain"])
        assert "at step 1" in proc.stdout
    elif row_id == "004-9":
        _run(cwd, commands[0], after=_sft_files(cwd))
        assert (cwd / "workspace" / "datasets" / "sft" / "podtrain" / "reasoning_data.jsonl").exists()
    elif row_id in ("004-10", "004-11", "004-12"):
        _run(cwd, "orchestrate sft prepare --stages instruct tool reasoning", after=_sft_files(cwd))
        chain = ROWS["004-10"] + ROWS["004-11"] + ROWS["004-12"]
        upto = {"004-10": 2, "004-11": 3, "004-12": 4}[row_id]
        for command in chain[:upto]:
            _run(cwd, command, after=[*tiny, "val_data=null", "seq_len=64", "model.max_seq_len=64"]
                 if command.startswith("train") else [])
        out = {"004-10": "instruct", "004-11": "tools", "004-12": "reasoning"}[row_id]
        emitted = json.loads((cwd / "checkpoints" / out / "final.config.json").read_text())
        assert emitted["optimizer"]["lr"] == 1e-5 and emitted["stage"] == out.rstrip("s")
    elif row_id == "004-13":
        _pretrained(cwd, "dense_25m", "checkpoints/pretrain/dense25m_ctx2k")
        _run(cwd, commands[0], after=["--seq-len", "32", "--max-batches", "2"])
        report = json.loads((cwd / "checkpoints/pretrain/dense25m_ctx2k/evaluate_latest.json").read_text())
        assert [r["data"] for r in report["results"]] == ["data/processed/pretrain"] and report["results"][0]["batches"] == 2
    elif row_id == "004-14":
        for command in commands:
            _run(cwd, command, after=[*tiny, "val_data=null"] if command.startswith("train") else [])
        assert "final" in _tags(cwd / "checkpoints" / "pretrain" / "dense65m_full")
    else:
        raise AssertionError(f"{row_id}: no tiny form written for this row")

"""The curate stage (sharder/curate/) on real text shards through datatrove's own steps."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console

from sharder.curate.run import run_curate
from sharder.manifest import load_manifest
from sharder.pipeline import ShardOptions, run_shard
from sharder.recipe import CurateConfig
from sharder.textshard import read_documents

ROOT = Path(__file__).resolve().parent.parent


def planted_corpus(distinct: int = 300, near: int = 120, exact: int = 40, seed: int = 0) -> list[tuple[int, str]]:
    """(family, text): ``distinct`` random-word documents, then near copies (1-5% of words replaced)
    and exact copies of some of them, shuffled so copies land in other shards."""
    rng = random.Random(seed)
    # letters only: datatrove's normalisation maps every digit to 0
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 9))) for _ in range(4000)]
    originals = [[rng.choice(vocab) for _ in range(rng.randrange(120, 300))] for _ in range(distinct)]
    docs = [(i, " ".join(words)) for i, words in enumerate(originals)]
    for _ in range(near):
        family = rng.randrange(distinct)
        words = list(originals[family])
        for position in rng.sample(range(len(words)), max(1, round(len(words) * rng.uniform(0.01, 0.05)))):
            words[position] = rng.choice(vocab)
        docs.append((family, " ".join(words)))
    for _ in range(exact):
        family = rng.randrange(distinct)
        docs.append((family, docs[family][1]))
    rng.shuffle(docs)
    return docs


def shard_dir(tmp_path: Path, texts: list[str], lines_per_shard: int = 100) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "docs.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "shards"
    run_shard(ShardOptions(input=[str(tmp_path / "in" / "docs.txt")], output_dir=out, mode="prod",
                           lines_per_shard=lines_per_shard), console=Console(file=io.StringIO()))
    return out


def curated(directory: Path) -> list[str]:
    return [d for p in load_manifest(directory).shard_paths(directory) for d in read_documents(p)]


# FineWeb's 14 x 8 bands aim at Jaccard ~0.8; 5% of words replaced leaves 5-gram Jaccard ~0.63, so the
# planted 1-5% edits need the preset docs/data.md recommends for them (3-grams, 20 bands of 5).
TUNED = {"preset": "light_edits"}


def test_minhash_presets_fill_what_is_not_given_and_fineweb_is_the_default():
    from sharder.recipe import DedupConfig

    assert DedupConfig().model_dump() == {"exact": True, "minhash": True, "preset": "fineweb", "n_grams": 5,
                                          "buckets": 14, "hashes_per_bucket": 8, "seed": 1}
    tuned = DedupConfig(**TUNED, buckets=24)
    assert (tuned.n_grams, tuned.buckets, tuned.hashes_per_bucket) == (3, 24, 5)


def test_planted_near_and_exact_duplicates_are_removed_and_distinct_documents_kept(tmp_path):
    docs = planted_corpus()
    source = shard_dir(tmp_path, [t for _, t in docs])
    summary = run_curate(source, tmp_path / "curated", CurateConfig(dedup=TUNED), Console(file=io.StringIO()))
    kept = curated(tmp_path / "curated")
    family_of = {}
    for family, text in docs:
        family_of.setdefault(text, family)
    survivors = {}
    for text in kept:
        survivors[family_of[text]] = survivors.get(family_of[text], 0) + 1
    families = {f for f, _ in docs}
    planted = len(docs) - len(families)
    removed_planted = planted - sum(n - 1 for n in survivors.values())
    lost = len(families - set(survivors))
    assert removed_planted / planted >= 0.95, (removed_planted, planted)
    assert lost / len(families) < 0.01, lost
    assert summary["output"] == len(kept) and summary["input"] == len(docs)


def test_dedup_reports_what_it_removed_per_recipe_source(tmp_path):
    import json

    import yaml

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha story {w}"}) + "\n"
                                              for w in ["one", "two", "one", "three", "two"]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"beta tale {w}"}) + "\n" for w in ["x", "y", "z"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": [{"type": "files", "path": "a.jsonl", "name": "a"},
                                                           {"type": "files", "path": "b.jsonl", "name": "b"}]}}))
    run_shard(ShardOptions(data=recipe, output_dir=tmp_path / "mixed", mode="prod", lines_per_shard=3),
              console=Console(file=io.StringIO()))
    summary = run_curate(tmp_path / "mixed", tmp_path / "out", CurateConfig(dedup={"minhash": False}),
                         Console(file=io.StringIO()))
    assert summary["sources"] == {"a": {"input": 5, "output": 3, "removed": 2}, "b": {"input": 3, "output": 3, "removed": 0}}
    totals = load_manifest(tmp_path / "out").source_totals()
    assert totals == {"a": [3, sum(len(f"alpha story {w}") for w in ["one", "two", "three"])],
                      "b": [3, sum(len(f"beta tale {w}") for w in "xyz")]}


def test_exact_dedup_alone_removes_normalised_copies_only(tmp_path):
    texts = ["The cat sat.", "the  CAT sat", "A dog ran far away.", "The cat sat on the mat."]
    source = shard_dir(tmp_path, texts, lines_per_shard=2)
    run_curate(source, tmp_path / "out", CurateConfig(dedup={"minhash": False}), Console(file=io.StringIO()))
    assert curated(tmp_path / "out") == ["The cat sat.", "A dog ran far away.", "The cat sat on the mat."]


def _curate_cli(source: Path, out: Path, recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sharder.curate", str(source), str(out), "--data", str(recipe)],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_during_dedup_then_rerun_is_byte_identical(tmp_path):
    import yaml

    source = shard_dir(tmp_path, [t for _, t in planted_corpus(distinct=600, near=200, exact=60)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": ["fineweb"], "curate": {"dedup": TUNED}}}))
    reference = tmp_path / "reference"
    done = _curate_cli(source, reference, recipe)
    assert done.wait() == 0, done.stderr.read()
    out = tmp_path / "killed"
    proc = _curate_cli(source, out, recipe)
    deadline = time.monotonic() + 120
    while not list(out.glob(".curate/dedup-*/logs/mh_buckets/completions/*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    rerun = _curate_cli(source, out, recipe)
    assert rerun.wait() == 0, rerun.stderr.read()
    ref, got = load_manifest(reference), load_manifest(out)
    assert [(s.name, s.sha256) for s in got.shards] == [(s.name, s.sha256) for s in ref.shards]
    assert got.total_lines < load_manifest(source).total_lines


def test_named_quality_filters_drop_what_datatrove_drops(tmp_path):
    prose = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that "
             "the proposal should be revised before the next meeting, and the chair thanked everyone for "
             "their careful work on the draft. ") * 3
    junk = "$$$ ### @@@ !!! ??? " * 20
    short = "too short to be a page"
    source = shard_dir(tmp_path, [prose, junk, short, prose + " Again."], lines_per_shard=2)
    summary = run_curate(source, tmp_path / "out", CurateConfig(quality={"gopher_quality": {}}),
                         Console(file=io.StringIO()))
    assert curated(tmp_path / "out") == [prose, prose + " Again."]
    assert summary["after_filters"] == 2
    with pytest.raises(Exception, match=r"data.curate.quality.gopher_quality.min_words: unknown option"):
        run_curate(source, tmp_path / "bad", CurateConfig(quality={"gopher_quality": {"min_words": 3}}))


def _tiny_checkpoint(directory: Path, texts: list[str]) -> Path:
    """A podtrain checkpoint (random weights, fixed seed) and a BPE trained on ``texts`` beside it."""
    import json

    import torch
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from training.config import validate_config
    from training.model import Transformer

    directory.mkdir()
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = validate_config({"train_data": "unused", "seq_len": 64, "model": {
        "vocab_size": 256, "d_model": 32, "num_layers": 1, "max_seq_len": 64, "attention": {"n_heads": 2}}})
    torch.manual_seed(0)
    save_model(Transformer(config.model), str(directory / "final.safetensors"))
    (directory / "final.config.json").write_text(json.dumps(config.to_plain()), encoding="utf-8")
    return directory


def test_perplexity_filter_drops_the_worst_percentile_and_a_new_threshold_reuses_the_side_file(tmp_path):
    import numpy as np

    rng = random.Random(1)
    words = ["river", "stone", "light", "garden", "window", "morning", "paper", "music"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))) for _ in range(40)]
    source = shard_dir(tmp_path, texts, lines_per_shard=15)
    model = _tiny_checkpoint(tmp_path / "ckpt", texts)
    ppl = {"checkpoint": str(model), "tokenizer": str(model / "tokenizer.json"), "drop_percentile": 25}
    summary = run_curate(source, tmp_path / "out", CurateConfig(perplexity=ppl), Console(file=io.StringIO()))
    (scores_dir,) = (tmp_path / "out" / ".curate").glob("scores-*")
    scores = {p.name[:-4]: np.load(p) for p in sorted(scores_dir.glob("*.npy"))}
    assert sorted(scores) == [p.name for p in load_manifest(source).shard_paths(source)]
    every = np.concatenate(list(scores.values()))
    assert len(every) == 40 and np.all(np.isfinite(every)) and len(set(every.round(6))) > 20
    limit = summary["perplexity_threshold"]
    expected = [t for t, s in zip(curated(source), every) if s <= limit]
    assert curated(tmp_path / "out") == expected and 28 <= len(expected) <= 31
    stamp = {p: p.stat().st_mtime_ns for p in scores_dir.glob("*.npy")}
    median = float(np.median(every))
    run_curate(source, tmp_path / "out", CurateConfig(perplexity={**ppl, "drop_percentile": None, "max_perplexity": median}),
               Console(file=io.StringIO()))
    assert {p: p.stat().st_mtime_ns for p in scores_dir.glob("*.npy")} == stamp  # not scored again
    assert curated(tmp_path / "out") == [t for t, s in zip(curated(source), every) if s <= median]



def test_changing_the_dedup_keeps_the_filtered_shards_and_changing_a_filter_redoes_both(tmp_path):
    prose = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that "
             "the proposal should be revised before the next meeting, and the chair thanked everyone for "
             "their careful work on the draft. ")
    texts = [prose * 3, prose * 3, "$$$ ### " * 40, prose * 2 + "Again and again."]  # 135, 135, -, 92 words
    source = shard_dir(tmp_path, texts, lines_per_shard=2)
    out = tmp_path / "out"

    def curate(quality: dict, dedup: dict) -> dict[str, int]:
        run_curate(source, out, CurateConfig(quality=quality, dedup=dedup), Console(file=io.StringIO()))
        return {p.parent.name: p.stat().st_mtime_ns for p in (out / ".curate").glob("filter-*/shard_*")}

    texts_left = [prose * 3, prose * 2 + "Again and again."]
    first = curate({"gopher_quality": {}}, {"minhash": False})
    assert curated(out) == texts_left
    second = curate({"gopher_quality": {}}, {"exact": False, "minhash": False})
    assert second == first  # the same filter folder, not rewritten
    assert curated(out) == [prose * 3, prose * 3, prose * 2 + "Again and again."]
    third = curate({"gopher_quality": {"min_doc_words": 100}}, {"minhash": False})
    assert set(third) - set(first)  # a new filter folder
    assert curated(out) == [prose * 3]


# Slurm is not installed here; this stands in for its `sbatch` (and `scontrol show hostnames`, which
# datatrove asks for the job's node list). It records each submission and,
# with FAKE_SLURM_RUN=1, runs the job at once (every array index in turn, in submission order, which
# is dependency order), so datatrove's real Slurm path runs: the pickled executor,
# `launch_pickled_pipeline`, ranks_to_run.json and the completion markers.
_SBATCH = """#!{python}
import json, os, re, subprocess, sys
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
last = int(re.search(r"#SBATCH --array=0-(\\d+)", text).group(1))
name = re.search(r"#SBATCH --job-name=(\\S+)", text).group(1)
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    job = sum(1 for _ in open(os.environ["FAKE_SLURM_LOG"])) + 100
    log.write(json.dumps({{"job": job, "name": name, "tasks": last + 1, "args": args,
                          "merge": "merge_stats" in text}}) + "\\n")
if os.environ.get("FAKE_SLURM_RUN") == "1" and "merge_stats" not in text:  # datatrove's stats summary: skipped
    for index in range(last + 1):
        subprocess.run(["bash", script], env={{**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_NODELIST": "localhost"}}, check=True,
                       stdout=subprocess.DEVNULL, stderr=open(os.environ["FAKE_SLURM_LOG"] + ".err", "a"))
print(f"Submitted batch job {{job}}")
"""


def _slurm(tmp_path: Path, monkeypatch) -> tuple[Path, CurateConfig, Path]:
    """A 3-shard corpus, the stand-in ``sbatch``/``scontrol`` on PATH, and a Slurm curate config."""
    docs = planted_corpus(distinct=60, near=20, exact=10)
    source = shard_dir(tmp_path, [t for _, t in docs], lines_per_shard=30)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(_SBATCH.format(python=sys.executable))
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$3"\n')  # scontrol show hostnames NODELIST
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    config = CurateConfig(dedup={**TUNED, "buckets": 4}, quality={"gopher_repetition": {}}, tasks=2, executor="slurm",
                          executor_options={"partition": "cpu", "time": "01:00:00", "with_srun": False})
    return source, config, log


def _submitted(log: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_slurm_executor_submits_each_step_as_a_job_array_of_its_tasks_each_after_the_one_before(tmp_path, monkeypatch):
    from sharder.curate.run import CurateLaunched

    source, config, log = _slurm(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_SLURM_RUN", "0")
    with pytest.raises(CurateLaunched, match="7 datatrove steps submitted to Slurm"):
        run_curate(source, tmp_path / "out", config, Console(file=io.StringIO()))
    jobs = [j for j in _submitted(log) if not j["merge"]]
    assert [(j["name"], j["tasks"]) for j in jobs] == [(f"podtrain-curate-{name}", tasks) for name, tasks in [
        ("filter", 2), ("exact_sigs", 2), ("exact_dups", 1), ("mh_sigs", 2), ("mh_buckets", 4), ("mh_remove", 1),
        ("write", 2)]]
    for before, after in zip(jobs, jobs[1:]):
        assert f"--dependency=afterok:{before['job']}" in after["args"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": ["fineweb"], "curate": config.model_dump()}}))
    cli = _curate_cli(source, tmp_path / "out", recipe)
    assert cli.wait() == 75  # submitted, not done: rerun once the jobs have finished
    # datatrove's own lines name each job and its launch script; ours comes last
    assert cli.stderr.read().strip().splitlines()[-1].startswith("curate: 7 datatrove steps submitted to Slurm")


@pytest.mark.slow
def test_slurm_run_through_datatrove_matches_the_local_executor_byte_for_byte(tmp_path, monkeypatch):
    source, config, log = _slurm(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    run_curate(source, tmp_path / "slurm", config, Console(file=io.StringIO()))
    local = config.model_copy(update={"executor": "local", "executor_options": {}})
    run_curate(source, tmp_path / "local", local, Console(file=io.StringIO()))
    digest = {d: [(s.name, s.sha256) for s in load_manifest(tmp_path / d).shards] for d in ("slurm", "local")}
    assert digest["slurm"] == digest["local"] and digest["local"]
    assert load_manifest(tmp_path / "local").total_lines < load_manifest(source).total_lines
    submitted = len(_submitted(log))
    (tmp_path / "slurm" / "manifest.json").unlink()
    run_curate(source, tmp_path / "slurm", config, Console(file=io.StringIO()))  # every step marked done
    assert len(_submitted(log)) == submitted and load_manifest(tmp_path / "slurm").complete


@pytest.mark.parametrize(("curate", "message"), [
    ({"executor": "slurm", "executor_options": {"time": "1:00:00"}}, "SlurmPipelineExecutor needs partition"),
    ({"executor": "slurm", "executor_options": {"partition": "a", "time": "1", "gpus": 1}},
     "executor_options.gpus: not an option of SlurmPipelineExecutor"),
    ({"executor_options": {"partition": "a"}}, "executor_options: only used by executor slurm or ray"),
])
def test_executor_settings_are_checked_before_any_work(curate, message):
    with pytest.raises(Exception, match=message):
        CurateConfig(**curate)


# A hand-written KenLM model (ARPA text; KenLM wants at least bigrams): three known words, <unk> unlikely.
_ARPA = """\\data\\
ngram 1=6
ngram 2=1

\\1-grams:
-3.0\t<unk>\t0
-99\t<s>\t0
-0.6\t</s>\t0
-0.4\triver\t0
-0.5\tstone\t0
-0.6\tlight\t0

\\2-grams:
-0.2\triver stone

\\end\\
"""


def test_perplexity_filter_scores_with_a_kenlm_model_file_when_given(tmp_path):
    kenlm = pytest.importorskip("kenlm", reason="the kenlm extra (pip install 'podtrain[kenlm]') is not installed")
    (tmp_path / "lm.arpa").write_text(_ARPA, encoding="utf-8")
    rng = random.Random(2)
    known = [" ".join(rng.choice(["river", "stone", "light"]) for _ in range(rng.randrange(3, 12))) for _ in range(12)]
    unknown = [" ".join(rng.choice(["xylem", "quartz", "vortex"]) for _ in range(rng.randrange(3, 12))) for _ in range(6)]
    texts = [t for pair in zip(known, unknown + [None] * 6) for t in pair if t is not None]
    source = shard_dir(tmp_path, texts, lines_per_shard=7)
    ppl = {"kenlm_model": str(tmp_path / "lm.arpa"), "max_perplexity": 50}
    summary = run_curate(source, tmp_path / "out", CurateConfig(perplexity=ppl), Console(file=io.StringIO()))
    assert curated(tmp_path / "out") == [t for t in texts if t in known]
    assert summary["perplexity_threshold"] == 50
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    (scores_dir,) = (tmp_path / "out" / ".curate").glob("scores-*")
    import numpy as np

    every = np.concatenate([np.load(p) for p in sorted(scores_dir.glob("*.npy"))])
    assert np.allclose(every, [model.perplexity(t) for t in curated(source)])
    with pytest.raises(Exception, match=r"data.curate.perplexity.kenlm_model .*nowhere.arpa: no such file"):
        run_curate(source, tmp_path / "bad", CurateConfig(perplexity={**ppl, "kenlm_model": str(tmp_path / "nowhere.arpa")}))


@pytest.mark.slow
def test_ray_run_through_datatrove_matches_the_local_executor_byte_for_byte(tmp_path):
    """datatrove's Ray executor on a local Ray instance (started by the executor): same shards as local."""
    pytest.importorskip("ray", reason="the ray extra (pip install 'podtrain[ray]') is not installed")
    docs = planted_corpus(distinct=60, near=20, exact=10)
    source = shard_dir(tmp_path, [t for _, t in docs], lines_per_shard=30)
    config = CurateConfig(dedup={**TUNED, "buckets": 4}, quality={"gopher_repetition": {}}, tasks=2, executor="ray")
    run_curate(source, tmp_path / "ray", config, Console(file=io.StringIO()))
    run_curate(source, tmp_path / "local", config.model_copy(update={"executor": "local"}), Console(file=io.StringIO()))
    digest = {d: [(s.name, s.sha256) for s in load_manifest(tmp_path / d).shards] for d in ("ray", "local")}
    assert digest["ray"] == digest["local"] and digest["local"]
    assert load_manifest(tmp_path / "local").total_lines < load_manifest(source).total_lines

"""fineweb-sharder on local FineWeb-shaped parquet/jsonl/txt written here, through the real `datasets`
streaming loaders: every mode, gzip, manifest contents, routing stability, resume and refusal rules,
lossless round trips, and each bad input (one line, nothing half-written)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import sysconfig
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from sharder.errors import ShardError
from sharder.manifest import MANIFEST_NAME, load_manifest
from sharder.pipeline import ShardOptions, ShardResult, run_shard
from sharder.routing import Router, hash_strings
from sharder.sources import hf_environment
from sharder.textshard import encode_lines, escape, read_documents

ROOT = Path(__file__).resolve().parent.parent
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")
SPECIAL = [
    "line one\nline two\n\nline four",
    "windows\r\nline endings\r\n",
    "old mac\rbreaks",
    "tabs\tinside\t\tand trailing\t",
    "back\\slash, \\n literal, \\\\ double, trailing \\",
    "emoji 🚀🔥 and a family 👨‍👩‍👧",
    "中文文本，日本語のテキスト、한국어",
    "unicode line separator\u2028paragraph\u2029form feed\x0cvertical\x0bnel\x85end",
    "\\",
    "   leading and trailing spaces   ",
]


# -- corpora ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _stdlib_lines() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.glob("*.py"))[:120]:
        lines.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
    return tuple(lines)


def documents(count: int, seed: int = 0, mean_lines: int = 12) -> list[str]:
    """Real text (runs of standard-library lines), with the SPECIAL documents mixed in."""
    lines = _stdlib_lines()
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        if i % 17 == 3:
            docs.append(SPECIAL[(i // 17) % len(SPECIAL)])
            continue
        n = rng.randint(1, 2 * mean_lines)
        start = rng.randrange(len(lines) - n)
        docs.append("\n".join(lines[start : start + n]).strip() or "pass")
    return docs


def fineweb_table(texts: list[str], first_id: int = 0, with_id: bool = True) -> pa.Table:
    """FineWeb's columns and types around ``texts``."""
    n = len(texts)
    columns = {
        "text": texts,
        "id": [f"<urn:uuid:{uuid.UUID(int=first_id + i)}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{first_id + i}" for i in range(n)],
        "date": ["2024-02-21T05:03:01Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/1.0/warc/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.9] * n,
        "token_count": [len(t) // 4 for t in texts],
    }
    if not with_id:
        del columns["id"]
    return pa.table(columns)


def write_parquet(directory: Path, texts: list[str], files: int = 2, row_group_size: int = 300) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths, per = [], -(-len(texts) // files)
    for index in range(files):
        chunk = texts[index * per : (index + 1) * per]
        path = directory / f"{index:03d}_00000.parquet"
        pq.write_table(fineweb_table(chunk, first_id=index * per), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_jsonl(path: Path, texts: list[str], first_id: int = 0, with_id: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = fineweb_table(texts, first_id, with_id).to_pylist()
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def run(**kwargs) -> ShardResult:
    return run_shard(ShardOptions(**kwargs), console=Console(file=io.StringIO()))


def shard_documents(directory: Path) -> list[str]:
    manifest = load_manifest(directory)
    return [doc for path in manifest.shard_paths(directory) for doc in read_documents(path)]


def concatenated(directory: Path) -> bytes:
    """The directory's text, shard after shard, decompressed: what 'byte for byte' compares."""
    out = b""
    for path in load_manifest(directory).shard_paths(directory):
        data = path.read_bytes()
        out += gzip.decompress(data) if path.name.endswith(".gz") else data
    return out


def assert_consistent(directory: Path) -> None:
    """Every listed shard is whole (size and sha256 as recorded); nothing else looks like a shard."""
    manifest = load_manifest(directory)
    for entry in manifest.shards:
        data = (directory / entry.name).read_bytes()
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256, entry.name
    listed = {entry.name for entry in manifest.shards} | {MANIFEST_NAME}
    extra = sorted(p.name for p in directory.iterdir() if p.name not in listed)
    assert not [name for name in extra if name.startswith("shard_")], extra


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharder", *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], list[Path]]:
    texts = documents(900, seed=1)
    return texts, write_parquet(tmp_path_factory.mktemp("parquet"), texts)


# -- modes and formats -----------------------------------------------------------------------------


def test_smoke_mode_takes_the_first_documents_and_writes_a_full_manifest(tmp_path, corpus):
    texts, files = corpus
    result = run(mode="smoke", take=250, lines_per_shard=100, input=[str(files[0].parent / "*.parquet")],
                 workspace=tmp_path, experiment="exp1")
    out = tmp_path / "datasets" / "train" / "exp1"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "shard_00000.txt", "shard_00001.txt",
                                                    "shard_00002.txt"]
    assert shard_documents(out) == texts[:250]
    data = json.loads((out / MANIFEST_NAME).read_text())
    assert data["version"] == 1 and data["mode"] == "smoke" and data["split"] == "train" and data["complete"]
    assert data["source"] == {"type": "parquet", "split": "train",
                              "files": [{"path": str(f), "bytes": f.stat().st_size} for f in files]}
    assert [s["lines"] for s in data["shards"]] == [100, 100, 50]
    for entry in data["shards"]:
        raw = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == entry["text_bytes"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert data["totals"] == {"shards": 3, "lines": 250, "bytes": sum(s["bytes"] for s in data["shards"]),
                              "text_bytes": sum(s["text_bytes"] for s in data["shards"])}
    assert data["resume"]["documents"] == 250 and data["resume"]["exhausted"] is False
    assert data["settings"]["lines_per_shard"] == 100 and data["settings"]["source"] == data["source"]
    train = result.splits["train"]
    assert (train.documents, train.shards, train.new_documents, train.resumed, train.complete) == (250, 3, 250, False, True)
    assert train.docs_per_s > 0 and train.mb_per_s > 0
    assert load_manifest(out).fingerprint() == load_manifest(out).fingerprint()


def test_smoke_take_defaults_to_10000_and_prod_reads_everything(tmp_path):
    texts = documents(10_050, seed=2, mean_lines=1)
    files = write_parquet(tmp_path / "in", texts, files=1, row_group_size=5000)
    smoke = run(mode="smoke", input=[str(files[0])], output_dir=tmp_path / "smoke", lines_per_shard=4000)
    assert smoke.splits["train"].documents == 10_000
    prod = run(mode="prod", input=[str(files[0])], output_dir=tmp_path / "prod", lines_per_shard=4000)
    assert prod.splits["train"].documents == len(texts)
    manifest = load_manifest(tmp_path / "prod")
    assert manifest.complete and manifest.resume["exhausted"] and len(manifest.shards) == 3
    assert shard_documents(tmp_path / "prod") == texts


def test_jsonl_and_gzip_shards_are_deterministic(tmp_path):
    texts = documents(300, seed=3)
    inputs = [write_jsonl(tmp_path / "a.jsonl", texts[:120]), write_jsonl(tmp_path / "b.jsonl.gz", texts[120:], 120)]
    args = dict(mode="prod", input=[str(p) for p in inputs], lines_per_shard=128, gzip=True)
    run(output_dir=tmp_path / "one", **args)
    run(output_dir=tmp_path / "two", **args)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [MANIFEST_NAME, "shard_00000.txt.gz", "shard_00001.txt.gz", "shard_00002.txt.gz"]
    assert shard_documents(tmp_path / "one") == texts
    with gzip.open(tmp_path / "one" / "shard_00000.txt.gz", "rt", encoding="utf-8", newline="\n") as fh:
        assert sum(1 for _ in fh) == 128
    first, second = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]  # no mtime/name in headers
    assert all(s.bytes < s.text_bytes for s in first.shards)


def test_txt_inputs_are_one_document_per_line(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first doc\n\nsecond doc with a\ttab\r\nthird \\ doc\n", encoding="utf-8")
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress("fourth\nfifth".encode()))
    result = run(mode="prod", input=[str(plain), str(packed)], output_dir=tmp_path / "out")
    assert shard_documents(tmp_path / "out") == ["first doc", "second doc with a\ttab", "third \\ doc", "fourth", "fifth"]
    assert result.filtered == 1  # the blank line


def test_min_text_length_drops_short_documents(tmp_path):
    texts = ["short", "", "a" * 50, "exactly ten", "b" * 9]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    result = run(mode="prod", input=[str(path)], output_dir=tmp_path / "out", min_text_length=10)
    assert shard_documents(tmp_path / "out") == ["a" * 50, "exactly ten"]
    assert result.filtered == 3 and result.source_documents == 5


# -- lossless --------------------------------------------------------------------------------------


def test_special_documents_round_trip_exactly(tmp_path):
    files = write_parquet(tmp_path / "in", SPECIAL, files=1)
    run(mode="prod", input=[str(files[0])], output_dir=tmp_path / "out", lines_per_shard=3, min_text_length=0)
    assert shard_documents(tmp_path / "out") == SPECIAL
    raw = concatenated(tmp_path / "out").decode()
    assert raw.count("\n") == len(SPECIAL) and "\r" not in raw  # one line per document


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1), min_size=1, max_size=30),
       st.booleans())
def test_any_text_round_trips(tmp_path, docs, use_gzip):
    directory = tmp_path / uuid.uuid4().hex
    path = write_jsonl(directory / "in.jsonl", docs)
    run(mode="prod", input=[str(path)], output_dir=directory / "out", lines_per_shard=7, gzip=use_gzip,
        min_text_length=0)
    assert shard_documents(directory / "out") == docs


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)))),
                         max_size=12), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_encoding_selected_rows_of_a_chunked_batch_is_the_reference(chunks, rng):
    """The shard writer's bulk encoder on the reader's chunked batches and routed row subsets equals
    the per-document definition; a selected null is refused, an unselected one is skipped."""
    texts = pa.chunked_array([pa.array(chunk, pa.string()) for chunk in chunks], pa.string())
    flat = [doc for chunk in chunks for doc in chunk]
    rows = np.array(sorted(rng.sample(range(len(flat)), rng.randint(0, len(flat)))), dtype=np.int64)
    expected = "".join(escape(flat[i]) + "\n" for i in rows.tolist() if flat[i] is not None).encode()
    if any(flat[i] is None for i in rows.tolist()):
        with pytest.raises(ValueError, match="null"):
            encode_lines(texts, rows)
    else:
        assert encode_lines(texts, rows) == expected
    if None not in flat:
        assert encode_lines(texts) == "".join(escape(doc) + "\n" for doc in flat).encode()


def test_encoding_bytes_that_are_not_utf8_keeps_them_as_they_are():
    """0xFF is the bulk encoder's terminator: a binary batch holding it goes document by document."""
    texts = pa.chunked_array([pa.array([b"a\xffb\n", b"skip"], pa.binary()), pa.array([b"c\\d"], pa.binary())])
    assert encode_lines(texts, np.array([0, 2])) == b"a\xffb\\n\nc\\\\d\n"


# -- split mode ------------------------------------------------------------------------------------


def test_split_routes_by_seeded_id_hash_stably(tmp_path, corpus):
    texts, files = corpus
    args = dict(mode="split", val_ratio=0.2, lines_per_shard=150, input=[str(f) for f in files])
    result = run(output_dir=tmp_path / "a", **args)
    train, val = shard_documents(tmp_path / "a" / "train"), shard_documents(tmp_path / "a" / "val")
    ids = fineweb_table(texts).column("id").combine_chunks()
    to_val = Router(0.2, 0).to_val(np.arange(len(texts)), pa.array(texts), ids)
    assert val == [t for t, v in zip(texts, to_val) if v]
    assert train == [t for t, v in zip(texts, to_val) if not v]
    assert 0.12 < len(val) / len(texts) < 0.28
    assert result.splits["val"].documents == len(val) and load_manifest(tmp_path / "a" / "val").split == "val"
    run(output_dir=tmp_path / "b", **args)  # a re-run routes identically
    for side in ("train", "val"):
        assert concatenated(tmp_path / "a" / side) == concatenated(tmp_path / "b" / side)
    run(output_dir=tmp_path / "c", seed=7, **args)
    assert shard_documents(tmp_path / "c" / "val") != val


def test_routing_hash_depends_only_on_the_key_and_seed():
    keys = [f"<urn:uuid:{uuid.UUID(int=i)}>" for i in range(2000)] + ["", "a", "ab" * 40, "é中🚀"]
    whole = hash_strings(pa.array(keys), 5)
    assert len(set(whole.tolist())) == len(keys)
    for start, stop in ((0, 1), (3, 700), (1999, len(keys))):  # another batch, another slice: same hashes
        assert (hash_strings(pa.array(keys).slice(start, stop - start), 5) == whole[start:stop]).all()
        assert (hash_strings(pa.array(keys[start:stop], pa.large_string()), 5) == whole[start:stop]).all()
    assert (hash_strings(pa.array(keys), 6) != whole).mean() > 0.99
    share = Router(0.1, 5).to_val(np.arange(2000), pa.array(keys[:2000]), pa.array(keys[:2000])).mean()
    assert 0.08 < share < 0.12


def test_routing_hash_values_are_pinned():
    """A directory split by an earlier release must route the same documents the same way when a
    resume or a larger --take runs on a newer one: the hash values themselves never change."""
    keys = ["<urn:uuid:00000000-0000-0000-0000-000000000001>", "<urn:uuid:d6b5e1c4-1f2a-4c1e-9b7a-0e6b3f1a2c9d>",
            "a", "é中🚀"]
    pinned = [0x3C340BB1DBFACDBD, 0x0636509331B9D4AD, 0x6E21445834D83CDD, 0x157232F9761FAEDF]
    assert hash_strings(pa.array(keys), 0).tolist() == pinned  # ids of several lengths
    assert hash_strings(pa.array(keys[:2]), 0).tolist() == pinned[:2]  # FineWeb's: all of one length


def test_empty_or_null_ids_route_by_text_not_all_to_one_side():
    texts = [f"document number {i}" for i in range(400)]
    ids = pa.array(["" if i % 2 else None for i in range(400)], pa.string())
    router = Router(0.25, 0)
    to_val = router.to_val(np.arange(400), pa.chunked_array([pa.array(texts)]), ids)
    assert to_val.tolist() == [router.is_val_text(t.encode()) for t in texts]
    assert 0.15 < to_val.mean() < 0.35


def test_split_a_few_val_rows_per_batch_are_gathered_exactly_across_shards_and_a_stop(tmp_path):
    """At a 3% ratio each 1000-row batch sends ~30 rows to val, which the writer gathers over several
    batches: val still holds exactly the routed documents in order, shards of exactly
    --lines-per-shard, and a stop mid-stream (--take) then a resume loses and repeats nothing."""
    texts = documents(4000, seed=5, mean_lines=3)
    files = write_parquet(tmp_path / "in", texts, files=2, row_group_size=1000)
    args = dict(mode="split", val_ratio=0.03, lines_per_shard=25, input=[str(f) for f in files])
    run(output_dir=tmp_path / "out", take=2100, **args)
    run(output_dir=tmp_path / "out", take=len(texts), **args)
    ids = pa.concat_arrays([pq.read_table(f, columns=["id"]).column("id").combine_chunks() for f in files])
    to_val = Router(0.03, 0).to_val(np.arange(len(texts)), pa.chunked_array([pa.array(texts)]), ids)
    assert shard_documents(tmp_path / "out" / "val") == [t for t, v in zip(texts, to_val) if v]
    assert shard_documents(tmp_path / "out" / "train") == [t for t, v in zip(texts, to_val) if not v]
    uninterrupted = run(output_dir=tmp_path / "ref", **args)
    assert [s.lines for s in load_manifest(tmp_path / "ref" / "val").shards][:-1] == [25] * (
        uninterrupted.splits["val"].shards - 1)
    assert_consistent(tmp_path / "out" / "val")


def test_split_without_id_routes_by_text_and_defaults_to_workspace_dirs(tmp_path):
    texts = documents(400, seed=4)
    path = write_jsonl(tmp_path / "in.jsonl", texts, with_id=False)
    run(mode="split", val_ratio=0.25, input=[str(path)], workspace=tmp_path / "ws", experiment="e")
    val = shard_documents(tmp_path / "ws" / "datasets" / "val" / "e")
    train = shard_documents(tmp_path / "ws" / "datasets" / "train" / "e")
    router = Router(0.25, 0)
    to_val = [router.is_val_text(t.encode()) for t in texts]
    assert val == [t for t, v in zip(texts, to_val) if v] and train == [t for t, v in zip(texts, to_val) if not v]


def test_split_take_counts_both_sides(tmp_path, corpus):
    _, files = corpus
    result = run(mode="split", val_ratio=0.3, take=200, lines_per_shard=64, input=[str(f) for f in files],
                 output_dir=tmp_path)
    assert result.splits["train"].documents + result.splits["val"].documents == 200
    assert load_manifest(tmp_path / "train").complete and load_manifest(tmp_path / "val").complete


# -- resume, refusal, overwrite --------------------------------------------------------------------


def test_larger_take_extends_and_rerun_is_a_no_op(tmp_path, corpus):
    _, files = corpus
    args = dict(mode="smoke", lines_per_shard=64, input=[str(f) for f in files])
    run(output_dir=tmp_path / "direct", take=500, **args)
    run(output_dir=tmp_path / "steps", take=170, **args)
    again = run(output_dir=tmp_path / "steps", take=170, **args)
    assert again.already_complete and again.new_documents == 0
    extended = run(output_dir=tmp_path / "steps", take=500, **args)
    assert extended.splits["train"].resumed and extended.new_documents == 330
    assert concatenated(tmp_path / "steps") == concatenated(tmp_path / "direct")


def test_resume_falls_back_to_skipping_when_the_saved_state_is_unusable(tmp_path, corpus):
    _, files = corpus
    args = dict(mode="smoke", lines_per_shard=100, input=[str(f) for f in files])
    run(output_dir=tmp_path / "direct", take=700, **args)
    run(output_dir=tmp_path / "steps", take=450, **args)
    path = tmp_path / "steps" / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["resume"]["datasets"] = "0.0.0"  # as if written by another `datasets` release
    data["resume"]["state"] = {"not": "a datasets state"}
    path.write_text(json.dumps(data))
    run(output_dir=tmp_path / "steps", take=700, **args)
    assert concatenated(tmp_path / "steps") == concatenated(tmp_path / "direct")


def test_refuses_a_directory_with_other_settings_or_source(tmp_path, corpus):
    _, files = corpus
    run(mode="prod", lines_per_shard=300, input=[str(files[0])], output_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ShardError, match=r"different source or settings.*lines_per_shard: 300 there, 200 now.*--overwrite"):
        run(mode="prod", lines_per_shard=200, input=[str(files[0])], output_dir=tmp_path)
    with pytest.raises(ShardError, match="different source or settings.*source"):
        run(mode="prod", lines_per_shard=300, input=[str(files[1])], output_dir=tmp_path)
    with pytest.raises(ShardError, match="different source or settings.*gzip"):
        run(mode="prod", lines_per_shard=300, input=[str(files[0])], output_dir=tmp_path, gzip=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    result = run(mode="prod", lines_per_shard=200, input=[str(files[1])], output_dir=tmp_path, gzip=True,
                 overwrite=True)
    assert not result.splits["train"].resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "shard_00000.txt.gz", "shard_00001.txt.gz",
                                                         "shard_00002.txt.gz"]


def test_refuses_unexplained_shards_and_cleans_crash_leftovers(tmp_path, corpus):
    texts, files = corpus
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard_00000.txt").write_text("someone else's\n")
    with pytest.raises(ShardError, match="shard files but no manifest.json"):
        run(mode="prod", input=[str(files[0])], output_dir=foreign)
    out = tmp_path / "out"
    run(mode="smoke", take=200, lines_per_shard=100, input=[str(files[0])], output_dir=out)
    (out / ".tmp-shard_00002.txt.abc123").write_text("torn")  # a killed writer's temporary
    (out / "shard_00002.txt").write_text("renamed, but the manifest was not updated\n")  # orphan
    run(mode="smoke", take=450, lines_per_shard=100, input=[str(files[0])], output_dir=out)
    assert_consistent(out)
    assert not list(out.glob(".tmp-*")) and shard_documents(out) == texts[:450]


def test_input_inside_the_output_directory_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "out" / "in.jsonl", ["a", "b"])
    with pytest.raises(ShardError, match=r"--input .*in.jsonl: inside the output directory"):
        run(mode="prod", input=[str(path)], output_dir=tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in.jsonl"]


def test_missing_listed_shard_is_refused(tmp_path, corpus):
    _, files = corpus
    run(mode="smoke", take=200, lines_per_shard=100, input=[str(files[0])], output_dir=tmp_path)
    (tmp_path / "shard_00001.txt").unlink()
    with pytest.raises(ShardError, match="shard_00001.txt: listed in manifest.json but missing"):
        run(mode="smoke", take=300, lines_per_shard=100, input=[str(files[0])], output_dir=tmp_path)


# -- bad input -------------------------------------------------------------------------------------


def _assert_nothing_written(directory: Path) -> None:
    assert not directory.exists() or not any(directory.rglob("*")), sorted(directory.rglob("*"))


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda d: [str(d / "missing.parquet")], {}, r"--input .*missing.parquet: no such file"),
        (lambda d: [str(d / "nothing-*.parquet")], {}, r"--input .*nothing-\*.parquet: matches no file"),
        (lambda d: [str(write_jsonl(d / "a.jsonl", ["x"]))], {"text_field": "body"},
         r"--text-field 'body': no such column .*a.jsonl"),
        (lambda d: [str(write_parquet(d, ["x"], files=1)[0])], {"text_field": "body"},
         r"--text-field 'body': no such column .*000_00000.parquet \(columns: text, id, dump"),
        (lambda d: [str(write_parquet(d, ["x"], files=1)[0])], {"text_field": "token_count"},
         r"--text-field 'token_count': column holds int64, not text"),
        (lambda d: [str(_write(d / "bad.parquet", b"PAR1 this is not parquet"))], {},
         r"--input .*bad.parquet: not a readable parquet file"),
        (lambda d: [str(_write(d / "bad.jsonl.gz", b"plain text"))], {}, r"--input .*bad.jsonl.gz: not a gzip file"),
        (lambda d: [str(_write(d / "bad.jsonl", b'{"text": "a"}\n{"text": \n'))], {},
         r"--input .*bad.jsonl:2: not valid JSON \(Expecting value at column 10\)$"),  # file:line, as an editor counts
        (lambda d: [str(_write(d / "empty.jsonl", b""))], {}, r"--input: no documents in the source"),
        (lambda d: [str(_zero_rows(d / "empty.parquet"))], {}, r"--input: no documents in the source"),
        (lambda d: [str(write_jsonl(d / "blank.jsonl", ["", ""]))], {}, r"no documents .*--min-text-length"),
        (lambda d: [str(_write(d / "x.csv", b"text\nhello\n"))], {}, r"--input .*x.csv: unsupported file type"),
        (lambda d: [str(write_jsonl(d / "a.jsonl", ["x"])), str(_write(d / "b.txt", b"y\n"))], {},
         r"--input mixes file types: json \(a.jsonl\), text \(b.txt\)"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, make, kwargs, message):
    inputs = make(tmp_path / "in")
    with pytest.raises(ShardError, match=message) as info:
        run(mode="prod", input=inputs, output_dir=tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    _assert_nothing_written(tmp_path / "out")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _zero_rows(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(fineweb_table([]), path)
    return path


def test_unwritable_output_directory_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", ["a", "b"])
    (tmp_path / "plain-file").write_text("not a directory")
    with pytest.raises(ShardError, match=r"plain-file/out: cannot write: Not a directory"):
        run(mode="prod", input=[str(path)], output_dir=tmp_path / "plain-file" / "out")


def test_corrupt_file_mid_stream_leaves_whole_shards(tmp_path):
    texts = documents(2500, seed=5, mean_lines=1)
    good = write_jsonl(tmp_path / "in" / "a.jsonl", texts)
    bad = _write(tmp_path / "in" / "b.jsonl", b'{"text": "fine"}\n{"text": broken}\n')
    # batches of 1000: two are written, the third needs rows of b.jsonl and fails
    with pytest.raises(ShardError, match=r"--input .*b.jsonl:2: not valid JSON \(Expecting value at column 10\)$"):
        run(mode="prod", input=[str(good), str(bad)], output_dir=tmp_path / "out", lines_per_shard=300)
    assert_consistent(tmp_path / "out")
    assert shard_documents(tmp_path / "out") == texts[:1800] and not list((tmp_path / "out").glob(".tmp-*"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, "--mode 'fast': expected one of smoke, prod, split"),
        ({"lines_per_shard": 0}, "--lines-per-shard 0: must be at least 1"),
        ({"take": 0}, "--take 0: must be at least 1"),
        ({"mode": "split", "val_ratio": 1.0}, "--val-ratio 1.0: must be between 0 and 1"),
        ({"min_text_length": -1}, "--min-text-length -1"),
        ({"experiment": "../up"}, "--experiment '../up': use letters"),
        ({"input": ["a.txt"], "dataset": "x/y"}, "--input and --dataset/--name/--source-split are exclusive"),
        ({"input": ["a.txt"], "source_split": "test"}, "--input and --dataset/--name/--source-split are exclusive"),
    ],
)
def test_invalid_options_name_the_flag(kwargs, message):
    with pytest.raises(ShardError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ShardOptions(**kwargs)


# -- Hugging Face environment, CLI -----------------------------------------------------------------


def test_hf_cache_defaults_into_the_workspace_and_token_precedence(tmp_path, monkeypatch):
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "HF_TOKEN", "HUGGINGFACEHUB_API_TOKEN"):
        monkeypatch.setenv(name, "placeholder")  # so that monkeypatch restores the original on teardown
        monkeypatch.delenv(name)
    cache_dir, token = hf_environment(tmp_path / "ws")
    assert os.environ["HF_HOME"] == str(tmp_path / "ws" / "hf_cache")
    assert cache_dir == str(tmp_path / "ws" / "hf_cache" / "datasets") and token is None
    monkeypatch.setenv("HF_TOKEN", "hf_second")
    assert hf_environment(tmp_path)[1] == "hf_second"
    monkeypatch.setenv("HUGGINGFACEHUB_API_TOKEN", "hf_first")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("HF_DATASETS_CACHE")
    assert hf_environment(tmp_path / "ws") == (str(tmp_path / "elsewhere" / "datasets"), "hf_first")


def test_dataset_by_name_goes_through_the_hub_code_path(tmp_path, corpus):
    """``--dataset`` takes what load_dataset takes: a local dataset folder exercises it offline."""
    texts, files = corpus
    result = run(mode="smoke", take=300, dataset=str(files[0].parent), output_dir=tmp_path / "out")
    assert result.new_documents == 300 and shard_documents(tmp_path / "out") == texts[:300]
    source = load_manifest(tmp_path / "out").source
    assert source == {"type": "hub", "dataset": str(files[0].parent), "name": None, "split": "train"}
    with pytest.raises(ShardError, match=r"^--name sample-10BT: BuilderConfig 'sample-10BT' not found"):
        run(mode="smoke", dataset=str(files[0].parent), name="sample-10BT", output_dir=tmp_path / "bad")
    with pytest.raises(ShardError, match=r"^--source-split validation: Bad split"):
        run(mode="smoke", dataset=str(files[0].parent), source_split="validation", output_dir=tmp_path / "bad")
    with pytest.raises(ShardError, match=r"^--dataset /nonexistent/folder: no such dataset"):
        run(mode="smoke", dataset="/nonexistent/folder", output_dir=tmp_path / "bad")
    _assert_nothing_written(tmp_path / "bad")


def test_cli_hub_unreachable_offline_is_one_line_exit_2_and_hides_the_token(tmp_path):
    secret = "hf_abcdefSECRETtoken123"
    proc = cli("--mode", "smoke", "--name", "sample-10BT", "--workspace", str(tmp_path),
               env={"HF_TOKEN": secret, "HUGGINGFACEHUB_API_TOKEN": secret})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: --dataset HuggingFaceFW/fineweb: cannot reach the Hugging Face Hub: "
                                   "offline mode is on (HF_HUB_OFFLINE=1)")
    assert secret not in proc.stdout + proc.stderr
    assert not (tmp_path / "datasets").exists()


def test_cli_runs_and_reports(tmp_path):
    texts = documents(120, seed=6)
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    proc = cli("--mode", "split", "--val-ratio", "0.1", "--input", str(path), "--lines-per-shard", "50",
               "--workspace", str(tmp_path / "ws"), "--experiment", "cli", "--gzip")
    assert proc.returncode == 0, proc.stderr
    assert "fineweb-sharder" in proc.stderr and "docs/s" in proc.stderr and "MB/s" in proc.stderr
    train = tmp_path / "ws" / "datasets" / "train" / "cli"
    val = tmp_path / "ws" / "datasets" / "val" / "cli"
    assert sorted(shard_documents(train) + shard_documents(val)) == sorted(texts)
    again = cli("--mode", "split", "--val-ratio", "0.1", "--input", str(path), "--lines-per-shard", "50",
                "--workspace", str(tmp_path / "ws"), "--experiment", "cli", "--gzip")
    assert again.returncode == 0 and "already complete" in again.stderr
    bad = cli("--mode", "split", "--val-ratio", "0.1", "--input", str(path), "--lines-per-shard", "60",
              "--workspace", str(tmp_path / "ws"), "--experiment", "cli", "--gzip")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "lines_per_shard: 50 there, 60 now" in bad.stderr

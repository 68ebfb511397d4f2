"""Encode stage: token shards the trainer reads, skip/re-encode rules, dtype choice, corrupt shards,
both engines agreeing, and resume after a real `encode` process is SIGKILLed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer import make_documents, write_text_dir
from typer.testing import CliRunner

from orchestrator.tokenizer.encode import EncodeError, encode_shards, load_token_manifest
from orchestrator.tokenizer.bpe import TokenizerBundle, prepare_tokenizer
from orchestrator.tokenizer.cli import app
from sharder.manifest import load_manifest
from sharder.textshard import escape, read_documents
from training.atomic import TMP_PREFIX
from training.token_shards import (
    HEADER_SIZE,
    TokenShardError,
    TokenShardWriter,
    check_token_ids,
    open_tokens,
    read_header,
)

VOCAB = 800
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("enc") / "text"
    write_text_dir(directory, make_documents(300_000, seed=3), num_shards=5, gz_every=2)
    return directory


@pytest.fixture(scope="module")
def bundle(text_dir: Path, tmp_path_factory) -> TokenizerBundle:
    return prepare_tokenizer([text_dir], tmp_path_factory.mktemp("bundle") / "tok", VOCAB)[0]


@pytest.fixture(scope="module")
def encoded(text_dir: Path, bundle: TokenizerBundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "train"
    result = encode_shards(text_dir, out, bundle, workers=2)
    assert (result.engine, result.shards_encoded, result.shards_skipped, result.complete) == ("tiktoken", 5, 0, True)
    return out


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tok"))}


def test_trainer_reads_documents_back(text_dir: Path, bundle: TokenizerBundle, encoded: Path) -> None:
    manifest = load_token_manifest(encoded)
    assert manifest["tokenizer"]["fingerprint"] == bundle.fingerprint
    assert [s["name"] for s in manifest["shards"]] == [f"shard_{i:05d}.tok" for i in range(5)]
    tok = bundle.load_tokenizer()
    for entry in manifest["shards"]:
        path = encoded / entry["name"]
        tokens = open_tokens(path, vocab_size=bundle.vocab_size)
        check_token_ids(path, bundle.vocab_size)
        assert tokens.dtype == np.uint16 and len(tokens) == entry["tokens"]
        assert tokens[-1] == bundle.eot_id
        ends = np.flatnonzero(tokens == bundle.eot_id)
        docs = np.split(np.asarray(tokens), ends + 1)[:-1]
        source = list(read_documents(text_dir / entry["source"]))
        assert len(docs) == len(source) == entry["documents"]
        assert [tok.decode(d[:-1].tolist()) for d in docs] == source
        assert entry["bytes_in"] == sum(len(d.encode()) for d in source)


def test_tokenizers_engine_writes_identical_shards(text_dir: Path, bundle: TokenizerBundle, encoded: Path, tmp_path: Path) -> None:
    result = encode_shards(text_dir, tmp_path / "hf", bundle, workers=1, engine="tokenizers")
    assert result.engine == "tokenizers"
    assert shard_bytes(tmp_path / "hf") == shard_bytes(encoded)


def test_skip_reencode_and_cleanup(text_dir: Path, bundle: TokenizerBundle, encoded: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    shutil.copytree(encoded, out)
    again = encode_shards(text_dir, out, bundle)
    assert (again.shards_encoded, again.shards_skipped, again.tokens) == (0, 5, 0)

    # A truncated shard and a leftover temporary: the shard is encoded again, the temporary removed.
    victim = out / "shard_00003.tok"
    victim.write_bytes(victim.read_bytes()[:-2])
    (out / f"{TMP_PREFIX}shard_00001.tok.abc").write_bytes(b"partial")
    fixed = encode_shards(text_dir, out, bundle)
    assert (fixed.shards_encoded, fixed.shards_skipped) == (1, 4)
    assert shard_bytes(out) == shard_bytes(encoded) and not list(out.glob(TMP_PREFIX + "*"))

    # Another tokenizer: everything is encoded again, and no shard of the old one survives.
    other = prepare_tokenizer([text_dir], tmp_path / "other", VOCAB - 100)[0]
    redone = encode_shards(text_dir, out, other)
    assert (redone.shards_encoded, redone.shards_skipped) == (5, 0)
    assert all(read_header(p).vocab_size == VOCAB - 100 for p in out.glob("*.tok"))
    assert load_token_manifest(out)["tokenizer"]["fingerprint"] == other.fingerprint


def test_changed_text_shard_is_reencoded(text_dir: Path, bundle: TokenizerBundle, encoded: Path, tmp_path: Path) -> None:
    text, out = tmp_path / "text", tmp_path / "tokens"
    shutil.copytree(text_dir, text)
    shutil.copytree(encoded, out)
    changed = text / "shard_00002.txt"
    docs = list(read_documents(changed))[:-3] + ["a new last document"]
    changed.write_text("".join(escape(d) + "\n" for d in docs), encoding="utf-8")
    manifest = load_manifest(text)
    entry = manifest.shards[2]
    entry.lines, entry.bytes = len(docs), changed.stat().st_size
    entry.sha256 = hashlib.sha256(changed.read_bytes()).hexdigest()
    manifest.save(text)

    result = encode_shards(text, out, bundle)
    assert (result.shards_encoded, result.shards_skipped, result.documents) == (1, 4, len(docs))
    tokens = open_tokens(out / "shard_00002.tok")
    last = tokens[np.flatnonzero(tokens == bundle.eot_id)[-2] + 1 : -1]
    assert bundle.load_tokenizer().decode(last.tolist()) == "a new last document"
    assert load_token_manifest(out)["shards"][2]["source_sha256"] == entry.sha256


def test_dtype_follows_the_full_id_space(text_dir: Path, bundle: TokenizerBundle, tmp_path: Path) -> None:
    """An end-of-text id of 65535 still fits uint16; 65536 needs uint32 (added tokens count)."""
    spec = json.loads(bundle.tokenizer_json.read_text())
    for eot_id, dtype in [(65535, np.uint16), (65536, np.uint32)]:
        for entry in spec["added_tokens"]:
            if entry["content"] == "<|endoftext|>":
                entry["id"] = eot_id
                spec["model"]["vocab"][entry["content"]] = eot_id
        source = tmp_path / f"eot{eot_id}.json"
        source.write_text(json.dumps(spec))
        imported, _ = prepare_tokenizer([text_dir], tmp_path / f"b{eot_id}", 70_000, tokenizer_json=source)
        assert (imported.vocab_size, imported.eot_id) == (eot_id + 1, eot_id)
        out = tmp_path / f"t{eot_id}"
        encode_shards(text_dir, out, imported, workers=1)
        tokens = open_tokens(out / "shard_00000.tok")
        assert tokens.dtype == dtype and read_header(out / "shard_00000.tok").itemsize == np.dtype(dtype).itemsize
        assert int(tokens[-1]) == eot_id and int(tokens[tokens != eot_id].max()) < VOCAB


def test_writer_dtype_boundary(tmp_path: Path) -> None:
    for vocab, top, dtype in [(65536, 65535, np.uint16), (65537, 65536, np.uint32)]:
        path = tmp_path / f"v{vocab}.tok"
        with TokenShardWriter(path, vocab_size=vocab, eot_id=top) as writer:
            writer.write(np.array([0, 1, top], dtype=np.int64))
        assert path.stat().st_size == HEADER_SIZE + 3 * np.dtype(dtype).itemsize
        assert open_tokens(path).tolist() == [0, 1, top]
    with pytest.raises(TokenShardError, match="out of range"):
        with TokenShardWriter(tmp_path / "bad.tok", vocab_size=65536, eot_id=0) as writer:
            writer.write(np.array([65536]))
    assert not (tmp_path / "bad.tok").exists()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"NOTATOKN" + b[8:], "not a token shard"),
        (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "unsupported token shard version 2"),
        (lambda b: b[:12] + (3).to_bytes(4, "little") + b[16:], "bad token dtype itemsize 3"),
        (lambda b: b[:-1], "does not match header"),
        (lambda b: b[:20], "truncated token shard header"),
    ],
    ids=["magic", "version", "dtype", "truncated", "short-header"],
)
def test_corrupt_header_is_a_clear_error(encoded: Path, tmp_path: Path, corrupt, message: str) -> None:
    path = tmp_path / "shard_00000.tok"
    path.write_bytes(corrupt((encoded / "shard_00000.tok").read_bytes()))
    with pytest.raises(TokenShardError, match=message) as err:
        open_tokens(path)
    assert str(path) in str(err.value)


def test_token_id_beyond_vocab_is_a_clear_error(encoded: Path, bundle: TokenizerBundle, tmp_path: Path) -> None:
    data = bytearray((encoded / "shard_00001.tok").read_bytes())
    data[HEADER_SIZE + 20 : HEADER_SIZE + 22] = (VOCAB + 5).to_bytes(2, "little")
    path = tmp_path / "shard_00001.tok"
    path.write_bytes(bytes(data))
    with pytest.raises(TokenShardError, match=rf"{path}: token id {VOCAB + 5} at position 10 >= vocab_size {VOCAB}"):
        check_token_ids(path, bundle.vocab_size)
    with pytest.raises(TokenShardError, match=f"{path}: written for a vocabulary of {VOCAB}"):
        open_tokens(path, vocab_size=VOCAB - 1)


def test_incompatible_tokenizer_falls_back_to_tokenizers(text_dir: Path, bundle: TokenizerBundle, tmp_path: Path) -> None:
    spec = json.loads(bundle.tokenizer_json.read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    source = tmp_path / "lower.json"
    source.write_text(json.dumps(spec))
    lower, _ = prepare_tokenizer([text_dir], tmp_path / "lower", VOCAB, tokenizer_json=source)
    with pytest.raises(EncodeError, match="cannot be run by tiktoken: has a Lowercase normalizer"):
        encode_shards(text_dir, tmp_path / "forced", lower, engine="tiktoken")
    result = encode_shards(text_dir, tmp_path / "auto", lower, workers=1)
    assert result.engine == "tokenizers"
    docs = list(read_documents(text_dir / "shard_00000.txt"))
    want = [i for d in lower.load_tokenizer().encode_batch(docs) for i in d.ids + [lower.eot_id]]
    assert open_tokens(tmp_path / "auto" / "shard_00000.tok").tolist() == want


def test_unreadable_text_shard_names_file_and_leaves_no_shard(bundle: TokenizerBundle, tmp_path: Path) -> None:
    text = tmp_path / "text"
    write_text_dir(text, ["fine", "also fine", "placeholder"], num_shards=1)
    (text / "shard_00000.txt").write_text("fine\nalso fine\nbad \\q escape\n")  # not a valid escape
    with pytest.raises(EncodeError, match=r"shard_00000.txt:3: unknown escape \\q"):
        encode_shards(text, tmp_path / "out", bundle, workers=1, engine="tokenizers")  # found by the worker
    assert not list((tmp_path / "out").glob("*.tok")) and not list((tmp_path / "out").glob(TMP_PREFIX + "*"))


def test_cli_encode_error_is_one_line(bundle: TokenizerBundle, text_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["encode", "--text-dir", str(text_dir), "--out-dir", str(tmp_path / "o"),
                                      "--bundle-dir", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "nope/meta.json: missing" in result.output


@pytest.fixture(scope="module")
def long_run(bundle: TokenizerBundle, tmp_path_factory) -> tuple[Path, Path]:
    """16 shards of text and their token shards from an uninterrupted run."""
    root = tmp_path_factory.mktemp("long")
    write_text_dir(root / "text", make_documents(5_000_000, seed=5), num_shards=16)
    encode_shards(root / "text", root / "reference", bundle)
    return root / "text", root / "reference"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_resume_after_interruption(bundle: TokenizerBundle, long_run: tuple[Path, Path], tmp_path: Path, sig: int) -> None:
    """Interrupt a real `encode` process once it has recorded a shard: SIGKILL to the whole process
    group (a lost pod), or SIGTERM to the parent (a spot notice), which stops its workers and
    exits 130. The rerun skips what was recorded and ends byte-identical to a clean run. The slower
    engine keeps the run long enough to be caught in the middle."""
    text, reference = long_run
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "orchestrator.tokenizer.cli", "encode", "--text-dir", str(text), "--out-dir", str(out),
           "--bundle-dir", str(bundle.directory), "--workers", "1", "--engine", "tokenizers"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if load_token_manifest(out)["shards"]:
                break
        except EncodeError:  # not written yet
            pass
        time.sleep(0.01)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    manifest = load_token_manifest(out)
    assert 1 <= len(manifest["shards"]) < 16 and not manifest["complete"]
    for path in out.glob("*.tok"):  # whatever is visible is whole
        read_header(path)
    if sig == signal.SIGTERM:
        assert "interrupted; run the same command again to resume" in err
        assert not list(out.glob(TMP_PREFIX + "*"))  # the workers discarded their partial shards

    result = encode_shards(text, out, bundle, workers=2)
    assert result.shards_skipped >= len(manifest["shards"]) and result.shards_encoded + result.shards_skipped == 16
    assert result.complete and not list(out.glob(TMP_PREFIX + "*"))
    assert shard_bytes(out) == shard_bytes(reference)

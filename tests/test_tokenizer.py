"""Tokenizer bundle: training on text shards, round trip, reuse, stale refusal, import, CLI errors."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import stdlib_documents
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.tokenizer.tiktoken_bpe import build_encoding
from orchestrator.tokenizer.bpe import (
    EOT_TOKEN,
    PAD_TOKEN,
    TokenizerBundle,
    TokenizerError,
    prepare_tokenizer,
    sample_documents,
)
from orchestrator.tokenizer.cli import app, parse_size
from sharder.manifest import Manifest, ShardEntry
from sharder.textshard import escape, open_text

VOCAB = 1000
MULTILINGUAL = [
    "Ceci n'est pas une pipe.\r\nÇa coûte 12,50 €.",
    "日本語の文章です。\n改行\\もあります。",
    "Emoji 👍🏽 and flags 🇩🇪 in text\twith tabs",
    "Ελληνικά και русский текст, 한국어 문장.",
    "",
]


def make_documents(max_bytes: int, seed: int = 0) -> list[str]:
    """Real Python sources cut into web-page-sized documents, with multilingual ones mixed in."""
    rng = random.Random(seed)
    docs: list[str] = []
    for source in stdlib_documents(max_bytes):
        while source:
            cut = rng.randint(200, 4000)
            docs.append(source[:cut])
            source = source[cut:]
        docs.append(MULTILINGUAL[len(docs) % len(MULTILINGUAL)])
    return docs


def write_text_dir(directory: Path, docs: list[str], num_shards: int, gz_every: int = 0) -> Manifest:
    """Text shards plus manifest.json, as the sharder writes them (every ``gz_every``-th shard gzipped)."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // num_shards)
    entries = []
    for i in range(num_shards):
        gz = bool(gz_every) and i % gz_every == gz_every - 1
        name = f"shard_{i:05d}.txt" + (".gz" if gz else "")
        chunk = docs[i * per : (i + 1) * per]
        with open_text(directory / name, "wt") as fh:
            fh.writelines(escape(doc) + "\n" for doc in chunk)
        data = (directory / name).read_bytes()
        entries.append(ShardEntry(name, len(chunk), len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(source={"kind": "test"}, mode="local", split="train", shards=entries, complete=True)
    manifest.save(directory)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("tok") / "text"
    write_text_dir(text, make_documents(400_000), num_shards=4, gz_every=2)
    return text


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> TokenizerBundle:
    bundle, status = prepare_tokenizer([corpus], tmp_path_factory.mktemp("bundle") / "tok", VOCAB)
    assert status == "trained"
    return bundle


def test_bundle_meta_and_transformers_loading(trained: TokenizerBundle) -> None:
    meta = json.loads((trained.directory / "meta.json").read_text())
    assert meta["vocab_size"] == trained.vocab_size == VOCAB
    assert (trained.eot_id, trained.pad_id) == (VOCAB - 2, VOCAB - 1)  # specials last: ids follow merge order
    assert meta["tokenizer_sha256"] == hashlib.sha256(trained.tokenizer_json.read_bytes()).hexdigest()
    assert meta["library"]["tokenizers"] and meta["settings"]["vocab_size"] == VOCAB
    assert 0 < meta["training"]["bytes"] <= meta["settings"]["sample_bytes"]

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(trained.tokenizer_json), eos_token=EOT_TOKEN, pad_token=PAD_TOKEN)
    text = "def tokenize(text):\n    return [t for t in text.split()]  # 42 ünïcode ✓"
    ids = hf.encode(text)
    assert ids == trained.load_tokenizer().encode(text).ids
    assert hf.decode(ids) == text
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (trained.eot_id, trained.pad_id, trained.vocab_size)


@pytest.fixture(scope="module")
def engines(trained: TokenizerBundle):
    return trained.load_tokenizer(), build_encoding(trained.tokenizer_json.read_text())


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_round_trip_any_text_and_tiktoken_agrees(engines, text: str) -> None:
    tok, encoding = engines
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert encoding.encode_ordinary(text) == ids
    assert encoding.decode(ids) == text


def test_literal_special_token_in_a_document_is_plain_text(trained: TokenizerBundle) -> None:
    text = f"a document quoting {EOT_TOKEN} and {PAD_TOKEN}"
    ids = trained.load_tokenizer().encode(text).ids
    assert trained.eot_id not in ids and trained.pad_id not in ids
    assert trained.load_tokenizer().decode(ids) == text
    assert trained.load_tokenizer(encode_special_tokens=False).encode(EOT_TOKEN).ids == [trained.eot_id]


def test_reuse_keeps_the_bundle(corpus: Path, trained: TokenizerBundle) -> None:
    before = trained.tokenizer_json.stat().st_mtime_ns
    bundle, status = prepare_tokenizer([corpus], trained.directory, VOCAB)
    assert status == "reused"
    assert bundle == trained
    assert trained.tokenizer_json.stat().st_mtime_ns == before


def test_stale_bundle_is_refused_naming_both_fingerprints(corpus: Path, trained: TokenizerBundle, tmp_path: Path) -> None:
    changed = tmp_path / "text"
    shutil.copytree(corpus, changed)
    manifest = write_text_dir(changed, make_documents(120_000, seed=1), num_shards=2)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(trained.directory, bundle_dir)
    with pytest.raises(TokenizerError) as err:
        prepare_tokenizer([changed], bundle_dir, VOCAB)
    assert trained.manifest_fingerprint in str(err.value) and manifest.fingerprint() in str(err.value)
    assert TokenizerBundle.load(bundle_dir).fingerprint == trained.fingerprint  # untouched


def test_other_settings_and_too_small_vocab_are_refused(corpus: Path, trained: TokenizerBundle) -> None:
    with pytest.raises(TokenizerError, match=r"other settings \(min_frequency 2 -> 3\)"):
        prepare_tokenizer([corpus], trained.directory, VOCAB, min_frequency=3)
    with pytest.raises(TokenizerError, match=f"{VOCAB} ids, more than vocab_size={VOCAB - 1}"):
        prepare_tokenizer([corpus], trained.directory, VOCAB - 1)


def test_sample_is_capped_and_spread_over_every_shard(corpus: Path) -> None:
    cap = 60_000
    stats = {"documents": 0, "bytes": 0}
    docs = [d for batch in sample_documents([corpus], cap, stats) for d in batch]
    assert 0.8 * cap < stats["bytes"] <= cap
    assert stats["documents"] == len(docs)
    assert sum(len(d.encode()) for d in docs) == stats["bytes"]
    firsts = [next(iter(open_text(p))) for p in sorted(corpus.glob("shard_*"))]
    texts = {escape(d) + "\n" for d in docs}
    assert all(first in texts for first in firsts)  # every shard contributes its beginning


def test_import_tokenizer_json_file_and_hf_directory(trained: TokenizerBundle, corpus: Path, tmp_path: Path) -> None:
    bundle, status = prepare_tokenizer([corpus], tmp_path / "a", VOCAB, tokenizer_json=trained.tokenizer_json)
    assert status == "imported"
    assert (bundle.fingerprint, bundle.vocab_size, bundle.eot_id) == (trained.fingerprint, VOCAB, trained.eot_id)
    assert bundle.tokenizer_json.read_bytes() == trained.tokenizer_json.read_bytes()
    # A later run without --tokenizer-json keeps the imported tokenizer.
    assert prepare_tokenizer([corpus], tmp_path / "a", VOCAB)[1] == "reused"

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A Hugging Face directory whose end-of-text token is only named by tokenizer_config.json.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(make_documents(50_000), trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], show_progress=False))
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(hf_dir)
    bundle, status = prepare_tokenizer([corpus], tmp_path / "b", VOCAB, tokenizer_json=hf_dir)
    assert status == "imported"
    assert bundle.eot_id == bundle.pad_id == tok.token_to_id("</s>")
    assert bundle.vocab_size == tok.get_vocab_size() and bundle.manifest_fingerprint is None


def test_import_larger_than_vocab_is_refused_before_writing(trained: TokenizerBundle, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=f"--tokenizer-json .* {VOCAB} ids, more than vocab_size=600"):
        prepare_tokenizer([corpus], tmp_path / "b", 600, tokenizer_json=trained.tokenizer_json)
    assert not (tmp_path / "b").exists()


def test_bad_inputs_fail_with_one_clear_line(trained: TokenizerBundle, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="nowhere/manifest.json: no manifest"):
        prepare_tokenizer([tmp_path / "nowhere"], tmp_path / "b", VOCAB)
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        prepare_tokenizer([corpus], tmp_path / "b", 100)
    with pytest.raises(TokenizerError, match="missing.json: no such file"):
        prepare_tokenizer([corpus], tmp_path / "b", VOCAB, tokenizer_json=tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="junk.json: not a tokenizers tokenizer.json"):
        prepare_tokenizer([corpus], tmp_path / "b", VOCAB, tokenizer_json=tmp_path / "junk.json")
    edited = tmp_path / "edited"
    shutil.copytree(trained.directory, edited)
    (edited / "tokenizer.json").write_text((edited / "tokenizer.json").read_text().replace('"ignore_merges":true', '"ignore_merges":false'))
    with pytest.raises(TokenizerError, match="does not match meta.json"):
        TokenizerBundle.load(edited)


def test_cli_train_reports_status_and_errors_in_one_line(corpus: Path, trained: TokenizerBundle, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["train", "--text-dir", str(corpus), "--bundle-dir", str(trained.directory), "--vocab-size", str(VOCAB)])
    assert ok.exit_code == 0, ok.output
    assert "tokenizer reused" in ok.output
    bad = runner.invoke(app, ["train", "--text-dir", str(tmp_path / "none"), "--bundle-dir", str(tmp_path / "b"), "--vocab-size", "512"])
    assert bad.exit_code == 1
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert "none/manifest.json: no manifest" in bad.output
    assert [parse_size(s) for s in ("2G", "500MB", "1.5k", "123")] == [2_000_000_000, 500_000_000, 1500, 123]
    size = runner.invoke(app, ["train", "--text-dir", str(corpus), "--bundle-dir", str(tmp_path / "b"), "--vocab-size", "512",
                               "--sample-bytes", "lots"])
    assert size.exit_code == 2 and "'lots' is not a size" in size.output

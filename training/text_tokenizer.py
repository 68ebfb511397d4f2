"""``tokenizer_path`` as the trainer reads it: a ``tokenizers.Tokenizer`` and its end-of-text id.

Seed 003 writes ``tokenizer_path: gpt2`` and means "whatever Hugging Face calls gpt2"; others
hand over the folder ``transformers`` saved, a bare ``tokenizer.json``, or a podtrain bundle. All of
them end up as one ``tokenizers.Tokenizer`` (Rust, ``encode_batch`` releases the GIL: the text
loader's background thread depends on that), so the order of attempts is:

1. a file: a ``tokenizer.json``;
2. a folder: a podtrain bundle (``meta.json`` names the end-of-text id), else its ``tokenizer.json``,
   else ``transformers.AutoTokenizer`` (a folder with only ``vocab.json``/``merges.txt``), whose
   fast backend is the same Rust tokenizer;
3. anything else: a hub id, fetched with ``huggingface_hub.snapshot_download`` (tokenizer files
   only), which with ``HF_HUB_OFFLINE=1`` answers from the local cache or fails.

The end-of-text id separates documents in the packed stream: a bundle's ``eot_id``, else the
``eos_token`` of ``tokenizer_config.json``, else the first of the usual names in the vocabulary. A
tokenizer without one is refused (documents would run into each other). A literal
``<|endoftext|>`` inside a document is encoded as text (``encode_special_tokens``), so the id
always marks a real boundary, as in the encode stage's token shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from training.tokenizer_bundle import META_FILE, TOKENIZER_FILE, TokenizerBundle, TokenizerError, configure_parallelism

EOT_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


@dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer and what packing needs from it."""

    tokenizer: Tokenizer
    eot_id: int
    vocab_size: int  # the id space: max id + 1, added tokens included
    source: str  # what tokenizer_path said

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added (the Rust batch encoder, GIL released; without
        offsets, which packing does not need and which cost about half the time on one core)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def share_cores() -> None:
    """Under torchrun, give each rank's Rust thread pool its share of the node's cores.

    Every rank tokenizes the whole stream (training/text_data.py); with one pool of every core per
    rank, 8 ranks would run 8x as many threads as cores. ``RAYON_NUM_THREADS`` (what the Python
    binding honours, tokenizers#1149) is read when the pool starts, so this runs before the first
    encode; a value the user set is kept.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))


def load_text_tokenizer(spec: str, key: str = "tokenizer_path") -> TextTokenizer:
    """Resolve ``spec`` (file, folder or hub id) to a :class:`TextTokenizer`; errors are one line naming ``key``."""
    configure_parallelism()
    share_cores()
    path = Path(spec).expanduser()
    if path.is_file():
        tok, config = _from_file(path, spec, key), {}
    else:
        folder = path if path.is_dir() else _hub_folder(spec, key)
        if (folder / META_FILE).is_file():
            try:
                bundle = TokenizerBundle.load(folder)
            except TokenizerError as exc:
                raise TokenizerError(f"{key} {spec}: {exc}") from None
            tok = bundle.load_tokenizer()
            return TextTokenizer(tok, bundle.eot_id, _id_space(tok), spec)
        tok = _from_file(folder / TOKENIZER_FILE, spec, key) if (folder / TOKENIZER_FILE).is_file() else _from_transformers(folder, spec, key)
        config = _read_json(folder / "tokenizer_config.json")
    tok.encode_special_tokens = True
    return TextTokenizer(tok, _eot_id(tok, config, spec, key), _id_space(tok), spec)


def _from_file(path: Path, spec: str, key: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises a bare Exception
        raise TokenizerError(f"{key} {spec}: {path} is not a tokenizers tokenizer.json ({' '.join(str(exc).split())[:160]})") from None


def _from_transformers(folder: Path, spec: str, key: str) -> Tokenizer:
    """The Rust backend of whatever ``transformers`` makes of a folder without ``tokenizer.json``."""
    try:
        from transformers import AutoTokenizer

        backend = getattr(AutoTokenizer.from_pretrained(str(folder)), "backend_tokenizer", None)
    except Exception as exc:  # transformers raises many types for a folder it cannot read
        raise TokenizerError(f"{key} {spec}: {folder} holds no tokenizer.json and transformers cannot load it "
                             f"({' '.join(str(exc).split())[:160]})") from None
    if backend is None:
        raise TokenizerError(f"{key} {spec}: {folder} has only a slow (Python) tokenizer; save it with a fast one (tokenizer.json)")
    return backend


def _hub_folder(spec: str, key: str) -> Path:
    """The hub repository's tokenizer files, from the local cache when offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline without a cached copy, unknown repo, gated: several types
        raise TokenizerError(f"{key} {spec}: no such file or folder, and not found on the Hugging Face hub or in its "
                             f"local cache ({' '.join(str(exc).split())[:160]})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _eot_id(tok: Tokenizer, config: dict[str, Any], spec: str, key: str) -> int:
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    for name in ([eos] if isinstance(eos, str) else []) + list(EOT_NAMES):
        found = tok.token_to_id(name)
        if found is not None:
            return int(found)
    raise TokenizerError(f"{key} {spec}: no end-of-text token ({', '.join(EOT_NAMES)} or tokenizer_config.json's eos_token); "
                         "packed documents need one between them")


def _id_space(tok: Tokenizer) -> int:
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1

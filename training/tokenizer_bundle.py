"""A tokenizer bundle on disk: ``tokenizer.json`` plus ``meta.json`` (format version 1).

Both the trainer (tokenizing text on the fly, the SFT chat bundle) and the orchestrator's
tokenizer stage read bundles, so the format lives here, in the lowest package that needs it;
training the BPE stays in ``orchestrator.tokenizer.bpe``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from training.atomic import read_versioned_json

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
META_VERSION = 1


class TokenizerError(ValueError):
    """The tokenizer cannot be trained, reused or loaded; the message is one line naming the path."""


@dataclass(frozen=True)
class TokenizerBundle:
    """A tokenizer on disk plus what the rest of the pipeline needs to know about it."""

    directory: Path
    vocab_size: int  # full id space: max id + 1, added tokens included
    eot_id: int
    pad_id: int
    fingerprint: str  # sha256 of tokenizer.json: the identity token caches depend on
    manifest_fingerprint: str | None  # what it was trained on (None for an imported tokenizer)
    origin: str  # "trained" or "imported"
    settings: dict[str, Any] = field(default_factory=dict)
    library: dict[str, str] = field(default_factory=dict)

    @property
    def tokenizer_json(self) -> Path:
        return self.directory / TOKENIZER_FILE

    def load_tokenizer(self, encode_special_tokens: bool = True) -> Tokenizer:
        """The ``tokenizers.Tokenizer``.

        With ``encode_special_tokens`` (the default, and what the encode stage uses) a literal
        ``<|endoftext|>`` inside a document is encoded as ordinary text, so the end-of-text id
        in a token stream always marks a real document boundary.
        """
        configure_parallelism()
        try:
            tok = Tokenizer.from_file(str(self.tokenizer_json))
        except Exception as exc:  # the Rust loader raises a bare Exception
            raise TokenizerError(f"{self.tokenizer_json}: cannot load tokenizer: {exc}") from None
        tok.encode_special_tokens = encode_special_tokens
        return tok

    def to_meta(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "origin": self.origin,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "tokenizer_sha256": self.fingerprint,
            "manifest_fingerprint": self.manifest_fingerprint,
            "settings": self.settings,
            "library": self.library,
        }

    @classmethod
    def load(cls, directory: str | Path) -> "TokenizerBundle":
        """Read a bundle and check that ``tokenizer.json`` is the file ``meta.json`` describes."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        meta = read_versioned_json(meta_path, META_VERSION, f"missing (is {directory} a tokenizer bundle?)", TokenizerError)
        try:
            bundle = cls(
                directory=directory,
                vocab_size=int(meta["vocab_size"]),
                eot_id=int(meta["eot_id"]),
                pad_id=int(meta["pad_id"]),
                fingerprint=meta["tokenizer_sha256"],
                manifest_fingerprint=meta["manifest_fingerprint"],
                origin=meta["origin"],
                settings=meta.get("settings", {}),
                library=meta.get("library", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenizerError(f"{meta_path}: malformed, bad or missing key {exc}") from None
        actual = file_sha256(bundle.tokenizer_json)
        if actual != bundle.fingerprint:
            raise TokenizerError(
                f"{bundle.tokenizer_json}: sha256 {actual[:12]} does not match {META_FILE} "
                f"({bundle.fingerprint[:12]}); the bundle was modified, remove {directory} to rebuild it"
            )
        return bundle


def file_sha256(path: Path) -> str:
    """The sha256 of a file; an unreadable file is a TokenizerError naming it."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read: {exc.strerror}") from None


def configure_parallelism() -> None:
    """Set TOKENIZERS_PARALLELISM before the first tokenizer use unless the user already did.

    Training and batch encoding use every core only with parallelism on. Set explicitly, the
    variable also stops tokenizers from printing its warning in any child this process forks
    later (a subprocess launch included); our own workers are spawned, never forked.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

"""One data source, resolved: the schema shared by recipes (``sharder.recipe``) and the registry
(``sharder.registry``), which builds these from its named entries; here, below both, so neither
imports the other.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A recipe section: unknown keys are errors, so a typo never silently takes a default; so is a
    non-finite number (``max_perplexity: .inf``, a ``source_weights`` entry of ``.nan``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SourceConfig(Strict):
    """One source after resolution: a hub dataset, local files, or a folder of PDFs.

    ``fields`` + ``format`` build the text from several columns (Q&A); otherwise ``text_field`` is
    the text. ``limit`` caps the documents taken from this source (after ``min_text_length``);
    ``limit_tokens`` caps its tokens, counted with the recipe's ``token_counter``.
    """

    type: Literal["hf", "files", "pdf"]
    name: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = Field(None, description="hf: the hub revision (refs/convert/parquet: the Hub's parquet conversion)")
    data_dir: str | None = Field(None, description="hf: the folder of the repository to read (a config of the parquet conversion)")
    path: str | None = None
    text_field: str = "text"
    fields: list[str] | None = None
    format: str | None = None
    limit: int | None = Field(None, ge=1)
    limit_tokens: int | None = Field(None, ge=1)
    chunk_chars: int = Field(4000, ge=200, description="PDF chunk target (cut at paragraph ends, 3-5k by default)")

    @model_validator(mode="after")
    def _complete(self) -> "SourceConfig":
        if self.type == "hf" and not self.dataset:
            raise ValueError("type hf needs 'dataset'")
        if self.type in ("files", "pdf") and not self.path:
            raise ValueError(f"type {self.type} needs 'path'")
        if (self.fields is None) != (self.format is None):
            raise ValueError("'fields' and 'format' go together (format: \"Q: {question}\\nA: {answer}\")")
        if self.format is not None:
            named = {f for _, f, _, _ in string.Formatter().parse(self.format) if f}
            unknown = sorted(named - set(self.fields or []))
            if unknown:
                raise ValueError(f"format uses {', '.join(unknown)} which is not in fields {self.fields}")
        return self

    @property
    def label(self) -> str:
        """The name reports and the manifest use for this source."""
        if self.name:
            return self.name
        if self.type == "hf":
            return self.dataset + (f"/{self.config}" if self.config else "")
        return Path(self.path or "").name or str(self.path)

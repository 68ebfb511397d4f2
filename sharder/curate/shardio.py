"""datatrove steps that read and write the project's text shards (docs/data.md), so datatrove's
own dedup and filter steps run between them unchanged.

Task ``rank`` of ``world_size`` takes input shards ``rank::world_size``; a document's id is
``<shard>/<line>``. The writer gives each input shard one output shard of the same name holding
the documents that survived, written atomically: a task killed midway leaves only whole shards,
and its rerun (datatrove reruns every task without a completion marker) writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from sharder.output import sources_file
from sharder.textshard import encode_lines, read_documents
from training.atomic import atomic_write_bytes


def line_sources(shard: Path) -> np.ndarray | None:
    """The source index of each line of ``shard`` (recipe runs), or None without a side file."""
    side = sources_file(shard)
    return np.frombuffer(side.read_bytes(), dtype="<u2") if side.exists() else None


class TextShardReader(PipelineStep):
    name = "text shards"
    type = "📖 - READER"

    def __init__(self, shards: list[str], missing_ok: bool = False) -> None:
        """``missing_ok``: the shards are a filter step's output, which omits a shard left empty."""
        super().__init__()
        self.shards = shards
        self.missing_ok = missing_ok

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for path in self.shards[rank::world_size]:
            if self.missing_ok and not Path(path).exists():
                continue
            name = Path(path).name
            sources = line_sources(Path(path))
            for line, text in enumerate(read_documents(path)):
                self.stat_update("documents")
                metadata = {"shard": name} if sources is None else {"shard": name, "source": int(sources[line])}
                yield Document(text=text, id=f"{name}/{line}", metadata=metadata)


class TextShardWriter(PipelineStep):
    name = "text shards"
    type = "💽 - WRITER"

    def __init__(self, output_dir: str, gzip: bool) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.gzip = gzip

    def _write(self, shard: str, texts: list[str], sources: list[int]) -> None:
        """The sources side file first, then the shard (as the sharder does): a visible shard has both."""
        import zlib

        import pyarrow as pa

        path = Path(self.output_dir) / shard
        if sources:
            atomic_write_bytes(sources_file(path), np.asarray(sources, dtype="<u2").tobytes())
        data = encode_lines(pa.array(texts, pa.string()))
        if self.gzip:
            data = zlib.compress(data, 1, wbits=31)
        atomic_write_bytes(path, data)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        current, texts, sources = None, [], []
        for doc in data:
            shard = doc.metadata["shard"]
            if shard != current and current is not None:
                self._write(current, texts, sources)
                texts, sources = [], []
            current = shard
            texts.append(doc.text)
            if "source" in doc.metadata:
                sources.append(doc.metadata["source"])
            self.stat_update("written")
        if current is not None:
            self._write(current, texts, sources)
        return
        yield  # a generator, as datatrove expects of a step

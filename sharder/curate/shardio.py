"""datatrove steps that read and write the project's text shards (docs/data.md), so datatrove's
own dedup and filter steps run between them unchanged.

Task ``rank`` of ``world_size`` takes input shards ``rank::world_size``; a document's id is
``<shard>/<line>``. The writer gives each input shard one output shard of the same name holding
the documents that survived, written atomically: a task killed midway leaves only whole shards,
and its rerun (datatrove reruns every task without a completion marker) writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from sharder.textshard import encode_lines, read_documents
from training.atomic import atomic_write_bytes


class TextShardReader(PipelineStep):
    name = "text shards"
    type = "📖 - READER"

    def __init__(self, shards: list[str]) -> None:
        super().__init__()
        self.shards = shards

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for path in self.shards[rank::world_size]:
            name = Path(path).name
            for line, text in enumerate(read_documents(path)):
                self.stat_update("documents")
                yield Document(text=text, id=f"{name}/{line}", metadata={"shard": name})


class TextShardWriter(PipelineStep):
    name = "text shards"
    type = "💽 - WRITER"

    def __init__(self, output_dir: str, gzip: bool) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.gzip = gzip

    def _write(self, shard: str, texts: list[str]) -> None:
        import zlib

        import pyarrow as pa

        data = encode_lines(pa.array(texts, pa.string()))
        if self.gzip:
            data = zlib.compress(data, 1, wbits=31)
        atomic_write_bytes(Path(self.output_dir) / shard, data)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        current, texts = None, []
        for doc in data:
            shard = doc.metadata["shard"]
            if shard != current and current is not None:
                self._write(current, texts)
                texts = []
            current = shard
            texts.append(doc.text)
            self.stat_update("written")
        if current is not None:
            self._write(current, texts)
        return
        yield  # a generator, as datatrove expects of a step

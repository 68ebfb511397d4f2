"""podtrain: sharder. ``fineweb-sharder`` streams FineWeb (or local files) into text shards.

Entry points: ``sharder.pipeline.run_shard(ShardOptions(...))`` and the CLI in ``sharder.cli``.
Formats (text shards, manifest.json): docs/data.md.
"""

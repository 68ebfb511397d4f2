"""The tokenizer stage: train or reuse the BPE (``bpe``), the tiktoken fast path (``tiktoken_bpe``),
encoding text shards to token shards (``encode``), and ``orchestrate tokenizer`` (``cli``)."""

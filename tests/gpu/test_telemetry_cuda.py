"""CUDA telemetry (marker ``gpu``): allocated and reserved GPU memory every log step, and the
token-id check turning a device-side assert into one line naming the shard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import BYTE_EOT, BYTE_VOCAB, byte_tokens, stdlib_documents, tiny_config
from training.config import validate_config
from training.token_shards import TokenShardError, TokenShardHeader
from training.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_memory_in_metrics(byte_corpus, tmp_path) -> None:
    cfg = validate_config(tiny_config(byte_corpus, tmp_path, num_steps=4, log_every=2, device="cuda", dtype="bfloat16"))
    assert train(cfg).exit_code == 0
    rows = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    for row in rows:
        assert 0 < row["gpu_mem_allocated_gb"] <= row["gpu_mem_reserved_gb"]


def test_bad_token_id_is_caught_before_the_device_assert(byte_corpus, tmp_path) -> None:
    tokens = byte_tokens(stdlib_documents(40_000))
    tokens[5] = 300
    bad = tmp_path / "bad.tok"
    bad.write_bytes(TokenShardHeader(len(tokens), BYTE_VOCAB, BYTE_EOT, 2).pack() + tokens.astype(np.uint16).tobytes())
    cfg = validate_config(tiny_config(byte_corpus, tmp_path, train_data=str(bad), num_steps=2, device="cuda"))
    with pytest.raises(TokenShardError, match=f"{bad}: token id 300 at position 5"):
        train(cfg)

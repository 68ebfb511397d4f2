"""The GPU path's settings, checked on the CPU (issue 23 item 7): under FSDP2 with bf16 parameters the
blocks still get the float32 RoPE tables (``cast_forward_inputs`` off, as under DDP and on one GPU),
and the CUDA allocator defaults to expandable segments unless the environment says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import json, os, torch
    import training.attention as attention_module
    from training.config import TrainConfig
    from training.distributed import setup
    from training.parallelize import build_model

    cfg = TrainConfig(train_data="unused", device="cpu", seq_len=16, batch_size=2, distributed={"strategy": "fsdp"},
                      model={"vocab_size": 97, "d_model": 32, "num_layers": 2, "max_seq_len": 16, "attention": {"n_heads": 4}})
    dist = setup(cfg.distributed, "cpu")
    model, net = build_model(cfg, dist, torch.bfloat16)
    seen = []
    original = attention_module.apply_rope
    def spy(x, cos, sin):
        seen.append([str(x.dtype), str(cos.dtype)])
        return original(x, cos, sin)
    attention_module.apply_rope = spy
    idx = torch.randint(0, 97, (2, 16))
    net(idx, idx)[1].backward()
    print("PROBE " + json.dumps({"rope": seen, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}))
    dist.shutdown()
""")


def probe() -> dict:
    base = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env={**base, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PROBE ")).removeprefix("PROBE "))


def test_fsdp_blocks_get_float32_rope_tables_and_expandable_segments_by_default() -> None:
    result = probe()
    assert result["rope"] and all(r == ["torch.bfloat16", "torch.float32"] for r in result["rope"]), result["rope"]
    assert result["alloc_conf"] == "expandable_segments:True"


def test_an_allocator_setting_from_the_environment_wins(monkeypatch) -> None:
    from training.config import DistributedConfig
    from training.distributed import setup

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    setup(DistributedConfig(strategy="none"), "cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"

"""Seed 003's ready-to-use configs, sized as the seed says by what `train --dry-run` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, seed_params", [("small", 25e6), ("medium", 120e6), ("experiment_complex_attn", 25e6)])
def test_dry_run_sizes_each_config_within_10_percent_of_the_seed(name: str, seed_params: float) -> None:
    proc = subprocess.run([sys.executable, "-m", "training", f"configs/{name}.yaml", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    params = int(re.search(r"^parameters: ([\d,]+)", proc.stdout, re.M).group(1).replace(",", ""))
    assert abs(params - seed_params) <= 0.1 * seed_params, params
    if name == "medium":  # LLaMA-like: RMSNorm, RoPE, SwiGLU, no biases, grouped-query attention
        for line in ("type: rmsnorm", "type: rope", "type: swiglu", "bias: false", "n_kv_heads: 4"):
            assert line in proc.stdout, line
    if name == "experiment_complex_attn":
        assert "type: complex" in proc.stdout

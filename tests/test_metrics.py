"""The peak-FLOPs table that MFU is computed against."""

from __future__ import annotations

import pytest

from training.metrics import GPU_PEAK_BF16, peak_flops_for


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA A10", 125e12),
    ("Tesla T4", None),
])
def test_device_names_resolve_to_their_peak(name, peak) -> None:
    assert peak_flops_for(name) == peak


def test_specific_names_come_before_the_names_they_contain() -> None:
    keys = [key for key, _ in GPU_PEAK_BF16]
    for i, general in enumerate(keys):
        for specific in keys[i + 1:]:
            assert general not in specific, f"{specific!r} is shadowed by {general!r} listed before it"

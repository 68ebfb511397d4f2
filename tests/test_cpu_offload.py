"""``optimizer.cpu_offload``: AdamW's state in host memory (training/host_optimizer.py on one device,
FSDP2's CPUOffloadPolicy under FSDP). On the CPU: the update is torch's AdamW, the state is where it
is said to be and how big, and a run with it resumes exactly. On a GPU (marked gpu): the GPU memory
it frees, measured."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from training.config import ConfigError, ModelConfig, OptimizerConfig, validate_config
from training.host_optimizer import HostAdamW, state_bytes_by_device
from training.model import Transformer
from training.optim import build_optimizer
from training.trainer import train


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, num_layers=2, max_seq_len=16, attention={"n_heads": 4}))


def test_host_adamw_is_torchs_adamw() -> None:
    ours, theirs = _model(), _model()
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, cpu_offload=True)
    opt_ours = build_optimizer(ours, cfg, "cpu", host_state=True)
    opt_theirs = build_optimizer(theirs, cfg.model_copy(update={"cpu_offload": False}), "cpu")
    assert isinstance(opt_ours, HostAdamW) and type(opt_theirs) is torch.optim.AdamW
    x = torch.randint(0, 64, (4, 16))
    for _ in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_the_state_is_two_float32_moments_per_parameter_on_the_host_and_stays_there_after_a_load() -> None:
    model = _model()
    opt = HostAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert state_bytes_by_device(opt) == {"cpu": 8 * n + 4 * tensors}  # exp_avg + exp_avg_sq, float32; a step counter each
    if torch.cuda.is_available():  # a load (resume) must not move the state to the parameters' device
        model.cuda()
        fresh = HostAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        fresh.load_state_dict(opt.state_dict())
        assert set(state_bytes_by_device(fresh)) == {"cpu"}


def test_offload_is_adamw_only() -> None:
    with pytest.raises(ConfigError, match="cpu_offload: implemented for type adamw, not sgd"):
        validate_config({"train_data": "x", "optimizer": {"type": "sgd", "cpu_offload": True}})


def test_a_run_with_offload_resumes_on_the_same_losses(byte_corpus, tmp_path) -> None:
    def run(out, resume=None, **extra):
        cfg = tiny_config(byte_corpus, out, **{"num_steps": 8, "save_every": 4, "eval_every": 100, **extra})
        cfg["optimizer"]["cpu_offload"] = True
        return train(validate_config(cfg), resume=resume)

    straight = run(tmp_path / "a", scheduler__total_steps=8)
    run(tmp_path / "b", scheduler__total_steps=8, num_steps=4)
    resumed = run(tmp_path / "b", resume="auto", scheduler__total_steps=8)
    assert straight.exit_code == resumed.exit_code == 0
    for step in range(5, 9):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], abs=1e-6), step


@pytest.mark.gpu
def test_offload_frees_the_adamw_state_from_gpu_memory() -> None:
    """Measured: torch.cuda.memory_allocated after the first step, with and without cpu_offload."""
    cfg = ModelConfig(vocab_size=32000, d_model=1024, num_layers=8, max_seq_len=256, attention={"n_heads": 16})
    allocated = {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = Transformer(cfg).cuda()
        opt = build_optimizer(model, OptimizerConfig(cpu_offload=offload), "cuda", host_state=offload)
        x = torch.randint(0, 32000, (2, 256), device="cuda")
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        allocated[offload] = torch.cuda.memory_allocated()
        n = sum(p.numel() for p in model.parameters())
        del model, opt
    freed = allocated[False] - allocated[True]
    print(f"cpu_offload: {n:,} parameters; GPU memory after step 1: {allocated[False] / 1e9:.3f} GB -> "
          f"{allocated[True] / 1e9:.3f} GB ({freed / 1e9:.3f} GB freed; AdamW moments are {8 * n / 1e9:.3f} GB)")
    assert freed >= 0.95 * 8 * n


@pytest.mark.gpu
def test_fsdp_with_cpu_offload_trains_and_resumes(byte_corpus, tmp_path) -> None:
    """FSDP2's CPUOffloadPolicy through the real launcher (one GPU is enough for FSDP's code path)."""
    import subprocess
    import sys

    import yaml

    cfg = tiny_config(byte_corpus, tmp_path, num_steps=6, save_every=3, eval_every=100)
    cfg.update(device="auto", distributed={"strategy": "fsdp"})
    cfg["optimizer"]["cpu_offload"] = True
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "training", str(path)]
    first = subprocess.run([*launch, "num_steps=3"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*launch, "--resume", "auto"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step 6/6" in second.stdout

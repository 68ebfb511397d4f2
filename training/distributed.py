"""Process group, model wrapping (none / DDP / FSDP2) and portable state dicts.

Everything the trainer needs to know about parallelism goes through :class:`Dist`, so the training
step reads the same on one CPU and on 64 GPUs. Settings come from the torchrun environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), so multi-node
``torchrun --nnodes`` needs no code change.

The single-file checkpoints (``final``, and every tag of a DDP or one-process run) are *full*
state dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``): FSDP shards are
gathered on save and re-sharded on load. FSDP's step and ``best`` tags are sharded instead
(training/sharded_checkpoint.py). Either kind written by 2 ranks resumes on 1 and the other way round.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.config import DistributedConfig

T = TypeVar("T")


class RankError(ValueError):
    """An error some ranks hit and every rank raises (:meth:`Dist.agree`); ``speaks`` on exactly one
    rank per distinct message, so each failure is printed once, by a rank that knows it.

    ``said()`` is called by every rank once the speaker has printed: it waits for all of them, so no
    rank exits (and has torchrun stop the speaker) before the line is out.
    """

    def __init__(self, message: str, speaks: bool, said: Callable[[], None] = lambda: None) -> None:
        super().__init__(message)
        self.speaks = speaks
        self.said = said


def resolve_device(spec: str, local_rank: int) -> torch.device:
    """``auto``: CUDA (this rank's GPU), else Apple MPS, else CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device: {spec!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec} requested but CUDA is not available on this machine (use device=auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: {spec} requested but MPS (Apple-silicon GPU) is not available on this machine (use device=auto or cpu)")
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    strategy: str  # none | ddp | fsdp
    device: torch.device
    reshard_after_forward: bool = True
    fsdp_no_sync: bool = False  # distributed.fsdp_no_sync: skip FSDP's reduce-scatter on all but the last micro-step
    control: Any = None  # gloo group on host tensors: flags and waits that must not touch the GPU or its timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def replicate(self, model: nn.Module) -> nn.Module:
        """DDP when the strategy asks for it: gradients live in the all-reduce buckets (no second copy), and
        buffers are not broadcast before every forward (the only ones, the RoPE tables, are computed alike everywhere)."""
        if self.strategy != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # torch >= 2.13 renamed the switch and warns about the old one (a warning per rank on stderr)
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters else {"broadcast_buffers": False}
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **sync)

    def shard(self, model: nn.Module, param_dtype: torch.dtype | None, cpu_offload: bool = False) -> None:
        """FSDP2: each block, then the root (embeddings, final norm, head), in place; ``cpu_offload``
        keeps the sharded parameters, gradients and optimizer state on the host (CPUOffloadPolicy)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # cast_forward_inputs off: the blocks take the float32 RoPE tables as they are, as under DDP and on
        # one GPU, instead of bf16 copies (x is bf16 already: the embedding's output under bf16 parameters).
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        for block in model.layers:  # type: ignore[attr-defined]
            fully_shard(block, mp_policy=policy, reshard_after_forward=self.reshard_after_forward, offload_policy=offload)
        fully_shard(model, mp_policy=policy, reshard_after_forward=self.reshard_after_forward, offload_policy=offload)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients for the next step. Under DDP they are zeroed in place, not freed: they
        are views of DDP's buckets (``gradient_as_bucket_view``), which DDP keeps either way, so freed
        gradients make the next backward allocate a second set beside the buckets: one more full
        gradient copy at peak, measured on CPU in tests/test_distributed.py."""
        optimizer.zero_grad(set_to_none=self.strategy != "ddp")

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """Around a micro-step's forward *and* backward (the hooks that reduce run inside backward): with
        ``enabled`` False, DDP skips its all-reduce (``no_sync``: its gradients are whole anyway) and,
        when ``fsdp_no_sync``, FSDP2 skips its reduce-scatter and keeps the unsharded float32 gradients
        until the last micro-step. Without ``fsdp_no_sync`` FSDP2 reduce-scatters every micro-step
        into the sharded gradients, as torchtitan does: no whole-model gradient on any rank."""
        if enabled or self.strategy == "none" or (self.strategy == "fsdp" and not self.fsdp_no_sync):
            yield
        elif self.strategy == "ddp":
            with model.no_sync():  # type: ignore[operator]
                yield
        else:
            model.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(value) / self.world_size if self.world_size > 1 else value

    def any_flag(self, *flags: bool) -> list[bool]:
        """Agree on flags across ranks (true anywhere = true everywhere): stop, save-now.

        Reduced on the host (gloo) group, so agreeing costs no GPU synchronisation.
        """
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in t.tolist()]

    def post_flag(self, flag: bool) -> Any:
        """Start agreeing on ``flag`` without waiting; ``read_flag`` on the handle gives the agreed value."""
        t = torch.tensor([float(flag)])
        return t, dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

    @staticmethod
    def read_flag(handle: Any) -> bool:
        t, work = handle
        work.wait()
        return bool(t.item())

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; a ValueError on any rank is raised on all of them as a :class:`RankError`.

        Without this, a rank whose data is missing exits with its line while the others wait in their
        next collective and die with a gloo traceback each. The lowest rank holding a message speaks
        for it; a message not every rank shares is prefixed with that rank.
        """
        try:
            value, error = fn(), None
        except ValueError as exc:
            value, error = None, exc
        if self.world_size == 1:
            if error is not None:
                raise error
            return value  # type: ignore[return-value]
        messages = self.gather_objects(None if error is None else str(error))
        if all(m is None for m in messages):
            return value  # type: ignore[return-value]
        if error is None:
            raise RankError("another rank failed", speaks=False, said=self.slow_barrier)
        mine = str(error)
        shared = all(m == mine for m in messages)
        raise RankError(mine if shared else f"rank {self.rank}: {mine}", speaks=messages.index(mine) == self.rank,
                        said=self.slow_barrier)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small Python values: resume metadata, an error line)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def slow_barrier(self) -> None:
        """Wait for every rank where one of them may be writing a checkpoint.

        On the host group, whose timeout (``distributed.save_timeout_s``) is long: a slow volume
        makes the other ranks wait here, never inside an NCCL collective with the short timeout
        that is there to catch a dead rank.
        """
        if self.world_size > 1:
            dist.barrier(group=self.control)

    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self, model: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (empty elsewhere under FSDP); a tied head is stored once."""
        sd = get_model_state_dict(model, options=self._FULL)
        if tied:
            sd.pop("lm_head.weight", None)
        return sd

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return get_optimizer_state_dict(model, optimizer, options=self._FULL)

    def check_weights(self, model: nn.Module, weights: dict[str, torch.Tensor] | None, tied: bool, source: str) -> None:
        """Compare names and shapes on rank 0 and raise the same one line on every rank.

        A size mismatch reports the first tensor and both shapes, instead of torch's list of
        every mismatching tensor (or a hang, if only rank 0 failed).
        """
        problem = None
        if weights is not None:
            expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if not (tied and k == "lm_head.weight")}
            missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
            if missing or unexpected:
                problem = f"{source}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            else:
                for name, shape in expected.items():
                    if tuple(weights[name].shape) != shape:
                        problem = (f"{source}: {name} has shape {list(weights[name].shape)} in the checkpoint but "
                                   f"{list(shape)} in this model (a changed model config?)")
                        break
        problem = self.broadcast_object(problem)
        if problem:
            raise ValueError(problem)

    def load_model_state(self, model: nn.Module, weights: dict[str, torch.Tensor] | None, tied: bool, source: str = "checkpoint") -> None:
        """Load full weights read on rank 0 only; they are broadcast tensor by tensor and sharded on arrival."""
        self.check_weights(model, weights, tied, source)
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=self.world_size > 1)
        set_model_state_dict(model, weights or {}, options=options)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world_size > 1)
        set_optimizer_state_dict(model, optimizer, state or {}, options=options)

    def shutdown(self) -> None:
        """Leave together: a rank that tears its group down while a peer is still inside a collective
        or saving (rank 0 writes ``final``) makes gloo abort the process at exit."""
        if self.initialized:
            self.slow_barrier()
            dist.destroy_process_group()


ALLOC_CONF = "expandable_segments:True"


def setup(cfg: DistributedConfig, device_spec: str) -> Dist:
    """Read the torchrun environment, pick the strategy, start the process group when needed.

    Before CUDA starts, ``PYTORCH_CUDA_ALLOC_CONF`` defaults to ``expandable_segments:True``
    (a variable already set wins): segments grow in place instead of leaving fragments between
    micro-batches of changing sizes (packed fine-tuning) and FSDP's gathers.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    # Only a launcher's environment counts: torchrun always sets LOCAL_RANK, while RunPod's Instant
    # Clusters export WORLD_SIZE (all GPUs of the cluster) to every shell, where a plain
    # `python -m training` must stay one process.
    launched = "LOCAL_RANK" in os.environ
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise ValueError(f"distributed.strategy: 'none' cannot run on {world} processes (use auto, ddp or fsdp)")
    device = resolve_device(device_spec, local_rank)
    if strategy != "none":
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=cfg.timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
    control = None
    if world > 1:
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.save_timeout_s))
    return Dist(rank, local_rank, world, strategy, device, cfg.reshard_after_forward, cfg.fsdp_no_sync, control)

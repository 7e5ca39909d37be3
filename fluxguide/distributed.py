"""Data-parallel training over ``torch.distributed``: one process per GPU (NCCL) or per CPU worker (gloo).

The training scripts run unchanged as a plain single process and under ``torchrun`` (docs/distributed.md has
the launch lines). Every function here is a no-op (or the identity) when no process group is running, so a
script calls them unconditionally. The scheme (DDP-style data parallelism):

- **Identical policy, different data.** Every rank builds the policy from the same seed (and
  :func:`data_parallel` / :func:`broadcast_parameters` copy rank 0's values to be sure); prompts, noise and
  policy sampling come from per-rank streams, :func:`rank_seed` (``seed + 1000 * rank``; rank 0 keeps the
  single-process streams, so a one-process ``torchrun`` run is bit-identical to a plain one).
- **Averaged gradients.** Each rank's loss is the mean over its own batch; averaging the gradients over ranks
  gives the gradient of the mean over the global batch (``world_size`` times the per-rank batch), before
  clipping and the optimizer step, so every rank takes the same step.
- **Gathered metrics.** :func:`mean_over_ranks` averages logged scalars over ranks (equal per-rank batches make
  that the mean over all samples) and pools per-rank standard deviations exactly; :func:`all_gather` collects
  per-sample tensors (e.g. PPO's rewards, for group statistics over every prompt).
- **Rank 0 writes.** Checkpoints, the W&B run, ``metrics.jsonl``, sample grids and ``guidance.safetensors``
  come from :func:`is_main` only (``fluxguide.harness.tracking.Tracker`` is inactive on other ranks by default).
- **Resume on any world size.** A checkpoint holds rank 0's state: every rank loads the same weights and
  optimizer state; rank 0 also restores its RNG streams, other ranks start fresh streams from
  :func:`rank_seed` with the resumed step (:func:`reseed_rank_streams`), so no rank-specific state is needed.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fluxguide.provenance import state_dict_digest

#: Seed offset between ranks' data / noise streams (``seed + RANK_SEED_STRIDE * rank``).
RANK_SEED_STRIDE = 1000
#: The environment variables ``torchrun`` sets for each worker.
TORCHRUN_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Whether a process group is running (``torchrun`` launched us and :func:`init_distributed` ran)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from torchrun; picks the GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """Whether this is rank 0, the one process that writes checkpoints, logs and images."""
    return rank() == 0


def init_distributed(device: str = "cpu") -> str:
    """Join the process group ``torchrun`` describes (if any) and return the device this rank trains on.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing is initialised and ``device`` comes back
    unchanged: the single-process path. A group already running (e.g. one a test spawned) is reused.

    Args:
        device: the script's ``--device``: ``"cpu"`` uses the gloo backend; ``"cuda"`` uses NCCL with GPU
            ``LOCAL_RANK`` of each machine (``"cuda:<i>"`` is refused under torchrun: every rank would share
            one GPU).

    Raises:
        RuntimeError: NCCL requested without CUDA, fewer GPUs than processes on this machine, or an incomplete
            torchrun environment.
    """
    kind = torch.device(device).type
    if is_initialized():
        return _rank_device(device, kind)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return device
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} but {missing} are not set: launch with torchrun (docs/distributed.md), which sets "
            "them for every worker, or unset WORLD_SIZE for a single process"
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {device} under torchrun uses the NCCL backend, but CUDA is not available in this process; "
                "use --device cpu (gloo backend) or a machine with GPUs"
            )
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise RuntimeError(f"distributed training supports --device cpu (gloo) or cuda (NCCL), got {device!r}")
    dev = _rank_device(device, kind)
    dist.init_process_group(backend=backend, device_id=torch.device(dev) if kind == "cuda" else None)
    return dev


def _rank_device(device: str, kind: str) -> str:
    """``cuda:<LOCAL_RANK>`` for CUDA (set as the current device), ``device`` otherwise."""
    if kind != "cuda":
        return device
    if torch.device(device).index is not None and world_size() > 1:
        raise RuntimeError(
            f"--device {device} names one GPU, but {world_size()} processes would share it: pass --device cuda "
            "and each rank takes GPU LOCAL_RANK"
        )
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {index} has no GPU: this machine has {torch.cuda.device_count()}; start at most that many "
            "processes per node (torchrun --nproc-per-node)"
        )
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def cleanup() -> None:
    """Leave the process group (at the end of a script; a no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank: a decision every rank takes together (e.g. stopping on a time
    budget each rank measures itself), so no rank is left waiting in a collective the others skipped."""
    if world_size() == 1:
        return bool(flag)
    buf = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item() > 0)


def rank_seed(seed: int, step: int = 0) -> int:
    """The seed of this rank's data / noise / sampling streams.

    At the start of a run (``step = 0``) it is ``seed + 1000 * rank``, so rank 0 uses the single-process
    streams. A resumed run (``step`` = the checkpoint's update count) gives ranks > 0 a fresh seed derived
    from ``(seed, rank, step)``, so they do not replay the data they saw at the start of the run.
    """
    r = rank()
    if step == 0 or r == 0:
        return seed + RANK_SEED_STRIDE * r
    digest = hashlib.sha256(f"fluxguide-rank-stream/{seed}/{r}/{step}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def reseed_rank_streams(seed: int, *generators: torch.Generator, step: int = 0) -> None:
    """Give ranks > 0 their own streams: reseed ``generators`` and torch's global RNG with :func:`rank_seed`.

    Call it after building the policy from the shared seed (the global RNG drives, e.g., PPO's policy
    sampling) and after loading a checkpoint, whose RNG states are rank 0's. Rank 0 keeps its streams: its
    run, and its resume, are exactly the single-process ones.
    """
    if rank() == 0:
        return
    s = rank_seed(seed, step)
    torch.manual_seed(s)
    for g in generators:
        g.manual_seed(s)


# ------------------------------------------------------------------------------------------- parameters
def data_parallel(module: nn.Module, **ddp_kwargs: object) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when several ranks train, else ``module`` itself.

    Train through the returned module (forward and backward average the gradients over ranks); keep the
    plain module for evaluation and saving. DDP copies rank 0's parameters to every rank when it is built.
    Buffers are not broadcast at every forward: guidance networks keep no running statistics, and the
    sampler calls the policy many times per update.
    """
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    params = [p for p in module.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    ids = [device.index] if device.type == "cuda" else None
    # Newer torch names "no buffer sync at every forward" forward_sync_buffers (broadcast_buffers warns there).
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs = {"forward_sync_buffers" if newer else "broadcast_buffers": False, **ddp_kwargs}
    return DistributedDataParallel(module, device_ids=ids, **kwargs)


def broadcast_parameters(parameters: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``parameters`` to every rank (identical initialisation, guaranteed)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks, in place (call between ``backward()`` and clipping).

    The explicit equivalent of DDP's gradient all-reduce, for loops where wrapping the module does not fit
    (e.g. a module called by a TorchRL collector and a loss). One all-reduce per dtype: the gradients are
    flattened together with a flag per parameter. A parameter without a gradient on some ranks counts as a
    zero gradient there (as in DDP); one without a gradient on every rank keeps ``grad = None``.
    """
    size = world_size()
    if size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        flat = torch.cat([
            *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group],
            torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device),
        ])
        dist.all_reduce(flat)
        present = flat[-len(group):]
        offset = 0
        for i, p in enumerate(group):
            n = p.numel()
            if present[i] > 0:
                grad = flat[offset:offset + n].view_as(p).div_(size)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            offset += n


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state dict (names, shapes, dtypes and bytes): equal iff the values are equal."""
    return state_dict_digest(module)


def check_in_sync(module: nn.Module, name: str = "policy") -> str:
    """Check that every rank holds the same values of ``module``; return their :func:`parameter_digest`.

    Data-parallel ranks must stay identical; a difference means an un-averaged gradient or a rank-local
    update. With several ranks each prints ``rank <r>/<world>: <name> sha256 <digest>``.

    Raises:
        RuntimeError: naming the ranks whose values differ from rank 0's.
    """
    digest = parameter_digest(module)
    if world_size() == 1:
        return digest
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    # One write of one short line: ranks share the launcher's stdout pipe, and print()'s separate write of the
    # newline let two ranks' lines run together.
    sys.stdout.write(f"rank {rank()}/{world_size()}: {name} sha256 {digest}\n")
    sys.stdout.flush()
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"the {name} differs between ranks: ranks {differ} do not match rank 0 (digests {digests}); "
            "a gradient was not averaged, or a rank updated its copy on its own"
        )
    return digest


# ---------------------------------------------------------------------------------------------- metrics
def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order (the tensor itself on one rank).

    The ranks' tensors must match in every dim but the first, which may differ (they are padded for the
    collective and trimmed after). The result is on ``tensor``'s device, detached.
    """
    tensor = tensor.detach()
    if world_size() == 1:
        return tensor
    device = _comm_device()
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    longest = int(max(int(s) for s in sizes))
    if local.shape[0] < longest:
        pad = torch.zeros((longest - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=device)
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]).to(tensor.device)


def mean_over_ranks(
    metrics: Mapping[str, float], *, pooled_std: Mapping[str, str] | None = None, count: int | None = None
) -> dict[str, float]:
    """Every metric averaged over ranks (one all-reduce); with equal per-rank batches, the mean over all samples.

    Args:
        metrics: this rank's scalars; every rank must pass the same names.
        pooled_std: ``{std_name: mean_name}`` pairs of per-rank (unbiased) standard deviations and their means,
            replaced by the exact standard deviation of all ranks' samples together (needs ``count``).
        count: samples per rank behind each ``pooled_std`` pair.

    Raises:
        ValueError: ``pooled_std`` without ``count``, or a name not in ``metrics``.
    """
    out = {k: float(v) for k, v in metrics.items()}
    pairs = dict(pooled_std or {})
    if pairs and count is None:
        raise ValueError("pooled_std needs count, the samples per rank behind each standard deviation")
    unknown = [k for k in (*pairs, *pairs.values()) if k not in out]
    if unknown:
        raise ValueError(f"pooled_std names {unknown}, which are not among the metrics {sorted(out)}")
    size = world_size()
    if size == 1:
        return out
    names = sorted(out)
    values = [out[k] for k in names]
    values += [out[s] ** 2 for s in pairs] + [out[m] ** 2 for m in pairs.values()]
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf)
    means = (buf / size).tolist()
    result = dict(zip(names, means[: len(names)], strict=True))
    var_mean = means[len(names): len(names) + len(pairs)]
    sq_mean = means[len(names) + len(pairs):]
    total = (count or 0) * size
    for (std_key, mean_key), v, m2 in zip(pairs.items(), var_mean, sq_mean, strict=True):
        # Sum of squares of all samples: per rank (n - 1) s^2 + n m^2; then the unbiased variance of the pool.
        ss = size * ((count - 1) * v + count * m2)
        var = (ss - total * result[mean_key] ** 2) / max(total - 1, 1)
        result[std_key] = max(var, 0.0) ** 0.5
    return result


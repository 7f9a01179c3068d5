"""One distributed code path: torchrun (``env://``) on N GPUs / nodes, or a single process anywhere.

``rank()`` and ``world_size()`` answer 0 and 1 without a process group, so the loss, the queue and
shuffle BN run unchanged in unit tests (the pattern of lightly's ``utils/dist.py``).
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # a slow rank (rank 0 scoring AP) is not a failure


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) if CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device(requested)


def init_distributed(device: torch.device) -> None:
    """Join the process group described by torchrun's environment; no-op for a single process."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    log.info("process group: backend=%s rank=%d world_size=%d", backend, rank(), world_size())


# ----- failure of one rank: no hung peers ---------------------------------------------------------
# A rank that raises inside a trial publishes its error in the process group's store and aborts its own
# connections: every peer waiting in a collective then fails within seconds (gloo: "connection closed by
# peer"; NCCL: the abort) instead of at the 30-minute collective timeout. The peers publish too (the
# first error wins) and every rank then re-forms the process group on a fresh store prefix, so the next
# trial starts clean. Used by the transfer runner around each trial.
_GENERATION = [0]  # process groups formed after a failure; names this generation's error key


def _error_key() -> str:
    return f"trial_error/{_GENERATION[0]}"


def publish_failure(message: str) -> str:
    """Record ``message`` as this generation's error unless a rank did first, then abort this rank's
    connections. Returns the first rank's error (``message`` itself on one process)."""
    if not is_dist():
        return message
    store = dist.distributed_c10d._get_default_store()
    first = store.compare_set(_error_key(), "", message).decode()
    try:
        dist.group.WORLD.abort()  # peers blocked in a collective with this rank fail now
    except Exception as e:  # noqa: BLE001  (already aborted by a peer's failure: nothing to close)
        log.debug("abort: %s", e)
    return first or message


def first_failure() -> str | None:
    """The error a rank published in this generation, if any (never blocks)."""
    if not is_dist():
        return None
    store = dist.distributed_c10d._get_default_store()
    return store.get(_error_key()).decode() if store.check([_error_key()]) else None


def all_ok() -> None:
    """A collective every healthy rank reaches at the end of a trial: raises when a peer failed (its
    aborted connections make the all-reduce fail), so that no rank records a success alone."""
    if is_dist():
        flag = torch.zeros(1, device=backend_device())
        dist.all_reduce(flag)


def reform_group() -> None:
    """After a failed trial, on every rank: replace the aborted process group by a new one (same backend,
    ranks and timeout) on a fresh prefix of the same store. Blocks until every rank has called it."""
    if not is_dist():
        return
    store, backend = dist.distributed_c10d._get_default_store(), dist.get_backend()
    r, w = rank(), world_size()
    dist.destroy_process_group()
    _GENERATION[0] += 1
    dist.init_process_group(backend, store=dist.PrefixStore(f"reformed{_GENERATION[0]}/", store), rank=r,
                            world_size=w, timeout=COLLECTIVE_TIMEOUT)
    log.info("process group re-formed after a failed trial (generation %d)", _GENERATION[0])



def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient flows back).

    All ranks must pass tensors of the same shape.
    """
    if not is_dist():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """``src``'s picklable ``obj`` on every rank (``obj`` itself on one process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=backend_device())
    return box[0]


def backend_device() -> torch.device:
    """Where collectives' tensors must live: this process's GPU under NCCL, else the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (moved to the backend's device and back if needed)."""
    if not is_dist():
        return tensor
    dev = backend_device()
    if tensor.device == dev:
        dist.all_reduce(tensor)
        return tensor
    t = tensor.to(dev)
    dist.all_reduce(t)
    return tensor.copy_(t)


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over processes, as a Python float (a host sync: for logging, not the hot path)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    return float(all_reduce_sum(t)) / world_size()


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` on rank 0 (a list in rank order); ``[obj]`` on one process, ``[]`` on other ranks."""
    if not is_dist():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out if is_main() else []

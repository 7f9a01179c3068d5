"""Resumable built-in trials: one checkpoint file per trial folder, written atomically by rank 0.

What a killed detection, segmentation or linear-probe trial needs to continue exactly as if it had never stopped
(bit-identical metrics on CPU, tested by killing trials with SIGKILL):

- the model's parameters and buffers (BN statistics included) and the optimizer's state (momentum);
- the iteration, which is also the data stream's position: every training sample is keyed by its place in
  this process's endless index stream and augmented from (seed, rank, place) alone
  (:class:`transfer.engines.torchvision.detection.samplers.KeyedSamples`), so a resumed run replays the index
  stream (indices only, no images) up to that batch and needs no loader state;
- every process's RNG states (torch, CUDA, numpy, python): torchvision's detectors draw their training
  resize and their RPN and RoI samples from the global torch RNG;
- every process's unreadable-image flags, so that metrics.json counts the images skipped before the kill;
- the stage: ``train`` (mid-schedule), ``trained`` (schedule done, before PreciseBN: a rerun redoes PreciseBN
  from the same batches), ``final`` (after PreciseBN: a rerun only evaluates; no optimizer state is kept);
- the protocol (the config fields that change results, the seed, the world size): a checkpoint of another
  protocol is refused with the fields that differ, never silently mixed into a result;
- the engine's own state (``extra``: tensors and plain containers), e.g. the linear probe's epoch and history.

A file of an older layout is read through the ``upgrade`` a trial checkpoint is given (it holds no RNG states:
none are restored then).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.data.folder import restore_unreadable_flags, unreadable_flags
from pretrain.utils import dist
from pretrain.utils.config import protocol_dict
from pretrain.utils.io import atomic_torch_save, safe_torch_load
from pretrain.utils.vocabulary import translate_tree
from transfer.engines.torchvision.detection.loop import unwrap

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
STAGES = ("train", "trained", "final")


class ProtocolChangedError(RuntimeError):
    """A trial's checkpoint was written with another protocol (config, seed or world size)."""


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _in_todays_names(protocol: Optional[dict]) -> dict:
    """A saved protocol with the config keys renamed since (:mod:`pretrain.utils.vocabulary`) in today's names."""
    protocol = dict(protocol or {})
    if isinstance(protocol.get("config"), dict):
        protocol["config"] = translate_tree(protocol["config"], warn=False)
    return protocol


def protocol_differences(old: Optional[dict], new: dict) -> List[str]:
    """The dotted names whose values differ between two protocols (``config.solver.base_lr``, ``seed``, ...).

    ``config.seed`` is not compared: the trial's own seed is (``seed``), and configs that had no seed key
    (the ImageNet probes, before every task had one) hold the same protocol."""
    a, b = _flatten(_in_todays_names(old)), _flatten(_in_todays_names(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "config.seed")


def check_protocol(path: Path, saved: Optional[dict], protocol: dict) -> None:
    """Raise :class:`ProtocolChangedError` naming the differing fields when ``saved`` is not ``protocol``
    (a checkpoint written before a config key was renamed is read in today's names)."""
    if saved == protocol:
        return
    diff = protocol_differences(saved, protocol)
    if not diff:
        return
    raise ProtocolChangedError(f"{path} was written with another protocol (differs in: {', '.join(diff) or 'unknown'});"
                               " delete it to restart the trial, or choose another --output")


def trial_protocol(cfg: Any, seed: int, world_size: int) -> dict:
    """What must match for a checkpoint to be continued: the result-changing config, the seed, the world size."""
    return {"config": protocol_dict(cfg), "seed": int(seed), "world_size": int(world_size)}


class TrialCheckpoint:
    """``<trial>/checkpoint.pth``: :meth:`save` (a collective: every process's RNG state is gathered to rank 0,
    which writes atomically) and :meth:`restore` (every process reads the file; a shared file system is assumed,
    as Detectron2's checkpointer does). ``upgrade``: a file without a ``stage`` (an older layout of this
    trial's engine) -> today's layout, or None where there is no older layout."""

    def __init__(self, path: Path, protocol: Optional[dict], upgrade: Optional[Callable[[dict], dict]] = None):
        self.path, self.protocol, self.upgrade = Path(path), protocol, upgrade

    def save(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, stage: str, iteration: int,
             losses: Dict[str, float], extra: Optional[dict] = None) -> None:
        """``model``: the module whose state is saved (e.g. only a linear head); ``extra``: the engine's own state,
        returned by :meth:`restore`."""
        assert stage in STAGES, stage
        ranks = dist.gather_objects({"rng": rng_state(), "unreadable": unreadable_flags()})
        if dist.is_main():
            atomic_torch_save({
                "stage": stage, "iteration": int(iteration), "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "rng": [r["rng"] for r in ranks], "unreadable": [r["unreadable"] for r in ranks],
                "losses": {k: float(v) for k, v in losses.items()}, "protocol": self.protocol,
                "extra": extra or {},
            }, self.path)
            log.info("checkpoint (%s, iteration %d) -> %s", stage, iteration, self.path)

    def restore(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[dict]:
        """Load the model (and the optimizer while training) and this process's RNG states from the checkpoint;
        returns ``{"stage", "iteration", "losses", "extra"}``, or None when there is none (a fresh trial).

        Call it last before the loop: the RNG states are restored here, and anything drawn after them
        (e.g. a model's random init) would shift the stream."""
        if dist.is_main():  # a write killed before its rename leaves a temporary file (a model's size) behind
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        state = safe_torch_load(self.path, map_location="cpu")  # RNG states must be CPU tensors
        if isinstance(state, dict) and "stage" not in state and self.upgrade is not None:
            state = self.upgrade(state)
            log.info("%s has an older layout: read as a trial checkpoint", self.path)
        if not isinstance(state, dict):
            raise ValueError(f"{self.path}: not a trial checkpoint of this suite; delete it to restart the trial")
        check_protocol(self.path, state.get("protocol"), self.protocol)
        if state.get("stage") not in STAGES:
            raise ValueError(f"{self.path}: not a trial checkpoint of this suite (stage {state.get('stage')!r}); "
                             "delete it to restart the trial")
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        rngs = state["rng"]
        if rngs is not None:  # None: an upgraded older layout, whose code kept no RNG states
            if len(rngs) != dist.world_size():  # the protocol holds the world size; this guards a hand-edited file
                raise ValueError(f"{self.path} holds RNG states of {len(rngs)} processes, this run has "
                                 f"{dist.world_size()}")
            set_rng_state(rngs[dist.rank()])
            restore_unreadable_flags(state["unreadable"][dist.rank()])
        log.info("resuming the trial from %s (%s, iteration %d)", self.path, state["stage"], state["iteration"])
        return {"stage": state["stage"], "iteration": int(state["iteration"]), "losses": dict(state["losses"]),
                "extra": dict(state.get("extra") or {})}

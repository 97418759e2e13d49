"""Saved training state: the output directory, resumable checkpoints (weights + optimizer, schedule, data position
and random states, in one atomic directory) and resuming from the newest complete one."""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning_fabric as L
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from litllm.files import atomic_dir
from litllm.errors import UserError
from litllm.training.fabric import FullySharded

STATE_FILE = "training_state.pt"


@dataclass
class Progress:
    """Where training is: optimizer steps done and the position in the data (saved for exact resume)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of this epoch already consumed


def prepare_out_dir(out_dir: Path, resume: bool | Literal["auto"], overwrite: bool) -> Path | None:
    """Apply the rule that nothing is overwritten silently; return the checkpoint to resume from, if any."""
    if resume:
        latest = latest_checkpoint(out_dir)
        if latest is None and resume is True:
            raise UserError(f"--resume true: no complete checkpoint under {out_dir} (use --resume auto to start fresh)")
        return latest
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out_dir} already exists; pass --resume auto to continue it or --overwrite true to start over"
            )
        shutil.rmtree(out_dir)
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under out_dir: `final`, else the highest `step-NNNNNN`.

    Complete means renamed into place with its training state; a killed run's temp dirs never count.
    """
    if (out_dir / "final" / STATE_FILE).is_file():
        return out_dir / "final"
    steps = [d for d in out_dir.glob("step-*") if (d / STATE_FILE).is_file()]
    return max(steps, key=lambda d: int(d.name.removeprefix("step-")), default=None)


def save_training_checkpoint(fabric: L.Fabric, directory: Path, save_weights: Callable[[Path, nn.Module], None],
                             model, optimizer, scheduler, progress: Progress) -> None:
    """Weights (`save_weights(dir, model)` writes an HF dir or PEFT adapter) plus everything an exact resume needs,
    in one atomic directory.

    Every process takes part in gathering the full weights and optimizer state (from their shards under FSDP);
    the first process writes them. The optimizer state is keyed by parameter name, so a run can resume under
    another strategy or device count.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # complete on the first process only
    sharded = isinstance(fabric.strategy, FullySharded)
    weights = get_model_state_dict(model.module, options=options) if sharded else None
    optimizer_state = get_optimizer_state_dict(model.module, optimizer.optimizer, options=options)
    rng_states = gather_rng_states(fabric)
    if fabric.global_rank == 0:
        full_model = model.module
        if sharded:  # the gathered weights in an unsharded copy of the model
            full_model = copy.deepcopy(fabric.strategy.layout)
            full_model.load_state_dict(weights, assign=True)
        with atomic_dir(directory) as tmp:
            save_weights(tmp, full_model)
            torch.save({
                "step": progress.step, "epoch": progress.epoch, "position": progress.position,
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": rng_states,
            }, tmp / STATE_FILE)
    fabric.barrier()


def gather_rng_states(fabric: L.Fabric) -> list[dict[str, torch.Tensor | None]]:
    """Each process's random number generator states, by rank: each draws its own dropout masks."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(fabric.device) if fabric.device.type == "cuda" else None}
    if fabric.world_size == 1:
        return [mine]
    states: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def load_training_state(fabric: L.Fabric, directory: Path, model, optimizer, scheduler) -> Progress:
    """Restore what save_training_checkpoint wrote (a run resumed on other device counts reuses the saved random
    states in turn: its dropout masks differ from the uninterrupted run's)."""
    state: dict[str, Any] = torch.load(directory / STATE_FILE, weights_only=True)
    # every process reads the whole state; under FSDP each keeps its shard of it
    options = StateDictOptions(full_state_dict=True) if isinstance(fabric.strategy, FullySharded) else None
    set_optimizer_state_dict(model.module, optimizer.optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][fabric.global_rank % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], fabric.device)
    return Progress(step=state["step"], epoch=state["epoch"], position=state["position"])

"""Saved training state: the output directory, resumable checkpoints (weights + optimizer, schedule, data position
and random states, in one atomic directory with a manifest), stopping cleanly on SIGTERM or Ctrl-C, and resuming
from the newest intact checkpoint."""
from __future__ import annotations

import copy
import hashlib
import json
import re
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning_fabric as L
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from litllm.errors import UserError
from litllm.files import atomic_dir, check_out_dir, refuse_to_overwrite, remove_entries
from litllm.training.args import TrainArgs
from litllm.training.fabric import FullySharded

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"  # written last: each file's size and sha256
# what a training run writes in its out_dir: checkpoints, logs, and the temp dirs of a write in progress
_RUN_ENTRY = re.compile(r"(step-\d+|final|logs)|\.(step-\d+|final)\.(tmp|old)-.+")


@dataclass
class Progress:
    """Where training is: optimizer steps done and the position in the data (saved for exact resume)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of this epoch already consumed


def prepare_out_dir(fabric: L.Fabric, out_dir: Path, resume: bool | Literal["auto"], overwrite: bool,
                    inputs: Iterable[Path | str | None]) -> Path | None:
    """Apply the rules on outputs; return the checkpoint to resume from, if any.

    Nothing is overwritten silently: an out_dir that holds a run needs --resume or --overwrite, and --overwrite
    removes only what a run writes (checkpoints, logs), never anything else found there. Every process checks (all
    see the same files, so all stop alike); the first removes, the others wait for it.
    """
    check_out_dir(out_dir, inputs)
    if resume:
        latest = latest_checkpoint(out_dir)
        if latest is None and resume is True:
            raise UserError(f"--resume true: no complete checkpoint under {out_dir} (use --resume auto to start fresh)")
        return latest
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists; pass --resume auto to continue it or --overwrite true to start "
                        "over")
    refuse_to_overwrite(out_dir, overwrite, owned=lambda name: _RUN_ENTRY.fullmatch(name) is not None)
    if fabric.global_rank == 0 and out_dir.exists():
        remove_entries(out_dir, [entry.name for entry in out_dir.iterdir()])
    fabric.barrier()
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint under out_dir: `final`, else the highest `step-NNNNNN`.

    Intact means renamed into place (a killed run's temp dirs never count) with every file the manifest lists at
    its size and hash; a damaged newer one (a disk that lost data) is skipped with a warning.
    """
    candidates = sorted(out_dir.glob("step-*"), key=lambda d: int(d.name.removeprefix("step-")) if
                        d.name.removeprefix("step-").isdigit() else -1)
    for directory in reversed([*candidates, out_dir / "final"] if (out_dir / "final").is_dir() else candidates):
        problem = damage(directory)
        if problem is None:
            return directory
        print(f"warning: skipping the checkpoint {directory}: {problem}", file=sys.stderr)
    return None


def damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None if it is intact."""
    manifest_file = directory / MANIFEST_FILE
    if not manifest_file.is_file():
        # written by litllm before manifests; its rename into place made it complete
        return None if (directory / STATE_FILE).is_file() else f"no {MANIFEST_FILE} (not a complete checkpoint)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is damaged"
    for name, (size, digest) in manifest.items():
        file = directory / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or truncated"
        if _sha256(file) != digest:
            return f"{name} does not match its hash"
    return None


class Checkpoints:
    """A run's resumable checkpoints: step-NNNNNN/ every --train.save_interval steps (the newest --train.keep_last of
    them kept), one at once when the run is told to stop (SIGTERM from a scheduler, Ctrl-C), and final/.

    `save_weights(dir, model)` writes the model's part (an HF dir or a PEFT adapter); the rest (optimizer,
    schedule, data position, random states) is the same for every script.
    """

    def __init__(self, fabric: L.Fabric, out_dir: Path, save_weights: Callable[[Path, nn.Module], None],
                 args: TrainArgs) -> None:
        self.fabric, self.out_dir, self.save_weights, self.args = fabric, out_dir, save_weights, args
        self.stop_signal: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> Checkpoints:
        """From here on, SIGTERM and Ctrl-C end the run at the next step boundary with a checkpoint."""
        self.previous_handlers = {sig: signal.signal(sig, self._request_stop)
                                  for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def after_step(self, model, optimizer, scheduler, progress: Progress, total_steps: int) -> None:
        """Save when one is due; if the run was told to stop, save and exit (130 after Ctrl-C, 143 after SIGTERM)."""
        stop_signal = self._agreed_stop_signal()
        if stop_signal or self.args.is_save_step(progress.step, total_steps):
            directory = self.out_dir / f"step-{progress.step:06d}"
            self.save(directory, model, optimizer, scheduler, progress)
            self._remove_old_steps()
        if stop_signal:
            self.fabric.print(f"Stopped after step {progress.step} and saved {directory}; continue with --resume auto")
            sys.exit(128 + stop_signal)

    def save_final(self, model, optimizer, scheduler, progress: Progress) -> None:
        self.save(self.out_dir / "final", model, optimizer, scheduler, progress)

    def _agreed_stop_signal(self) -> int:
        """The stop signal any process got (all stop at the same step, as saving needs every one of them)."""
        local = torch.tensor(self.stop_signal or 0, device=self.fabric.device)
        return int(self.fabric.all_reduce(local, reduce_op="max")) if self.fabric.world_size > 1 else int(local)

    def _remove_old_steps(self) -> None:
        if self.args.keep_last is None or self.fabric.global_rank != 0:
            return
        steps = sorted(self.out_dir.glob("step-*"), key=lambda d: d.name)
        remove_entries(self.out_dir, [step.name for step in steps[:-self.args.keep_last]])

    def save(self, directory: Path, model, optimizer, scheduler, progress: Progress) -> None:
        """Weights plus everything an exact resume needs, in one atomic directory.

        Every process takes part in gathering the full weights and optimizer state (from their shards under FSDP);
        the first process writes them. The optimizer state is keyed by parameter name, so a run can resume under
        another strategy or device count.
        """
        fabric = self.fabric
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
                self.save_weights(tmp, full_model)
                torch.save({
                    "step": progress.step, "epoch": progress.epoch, "position": progress.position,
                    "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_states,
                }, tmp / STATE_FILE)
                write_manifest(tmp)
        fabric.barrier()


def write_manifest(directory: Path) -> None:
    """Each file's size and sha256, written last: what `damage` checks a checkpoint against."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    manifest = {path.relative_to(directory).as_posix(): (path.stat().st_size, _sha256(path)) for path in files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gather_rng_states(fabric: L.Fabric) -> list[dict[str, torch.Tensor | None]]:
    """Each process's random number generator states, by rank: each draws its own dropout masks."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(fabric.device) if fabric.device.type == "cuda" else None}
    if fabric.world_size == 1:
        return [mine]
    states: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def saved_progress(directory: Path) -> Progress:
    """Where the checkpoint in `directory` stopped, read without loading its optimizer state into memory."""
    state = torch.load(directory / STATE_FILE, weights_only=True, mmap=True)
    return Progress(step=state["step"], epoch=state["epoch"], position=state["position"])


def load_training_state(fabric: L.Fabric, directory: Path, model, optimizer, scheduler) -> Progress:
    """Restore what Checkpoints.save wrote (a run resumed on other device counts reuses the saved random states in
    turn: its dropout masks differ from the uninterrupted run's)."""
    try:
        state: dict[str, Any] = torch.load(directory / STATE_FILE, weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise UserError(f"{directory / STATE_FILE}: cannot be read ({' '.join(str(error).split())[:200]}); resume "
                        "from another checkpoint with --resume true after removing this one") from None
    # every process reads the whole state; under FSDP each keeps its shard of it
    options = StateDictOptions(full_state_dict=True) if isinstance(fabric.strategy, FullySharded) else None
    set_optimizer_state_dict(model.module, optimizer.optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][fabric.global_rank % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], fabric.device)
    return Progress(step=state["step"], epoch=state["epoch"], position=state["position"])

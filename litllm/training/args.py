"""The settings every training script shares: the `--train.*` group and the names of the other shared options."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from litllm.errors import UserError

# the choices of the options every training script takes; each script's signature names these types
Strategy = Literal["auto", "ddp", "fsdp"]
OptimizerName = Literal["AdamW", "AdamW8bit"]
LoggerName = Literal["csv", "tensorboard", "wandb"]


@dataclass
class TrainArgs:
    """Training loop settings (the `--train.*` options).

    Attributes:
        global_batch_size: examples per optimizer step.
        micro_batch_size: examples per forward/backward; gradients accumulate over
            global_batch_size / micro_batch_size micro-batches, normalized so this equals one big batch.
        max_steps: optimizer steps to run; overrides epochs when set.
        epochs: passes over the training data (when max_steps is not set).
        max_seq_length: longer examples are truncated (and counted in the log).
        lr: peak learning rate, reached after warmup_steps, then cosine-decayed to min_lr.
        min_lr: learning rate at the last step.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        log_interval: log every N steps.
        eval_interval: compute the validation loss every N steps (None: only at the end).
        eval_max_batches: at most this many validation micro-batches per evaluation (None: all).
        save_interval: write a resumable checkpoint every N steps (None: only the final one). A run stopped by
            SIGTERM or Ctrl-C also saves one before it exits.
        keep_last: keep only the newest N step-NNNNNN checkpoints (None: all of them); final/ is always kept.
        activation_checkpointing: recompute each block's activations in backward to save memory.
        loss_chunk_size: tokens per cross-entropy chunk, so the full fp32 logits never exist at once: one chunk's
            are chunk x vocab floats (50 MB for a 49k vocabulary at 256; 256 rather than 1024 lowered SmolLM2's
            peak RSS by ~0.2 GB for ~1% of a step's time, benchmarks/RESULTS.md).
        compile: compile each transformer block with torch.compile for training (forward and backward; evaluation and
            sampling stay eager). Losses equal eager's to float32 rounding, dropout included; the first steps pay a
            one-off compile (about a minute on CPU).
    """

    global_batch_size: int = 16
    micro_batch_size: int = 4
    max_steps: int | None = None
    epochs: int = 1
    max_seq_length: int = 512
    lr: float = 2e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    log_interval: int = 1
    eval_interval: int | None = 50
    eval_max_batches: int | None = None
    save_interval: int | None = 1000
    keep_last: int | None = None
    activation_checkpointing: bool = False
    loss_chunk_size: int = 256
    compile: bool = False

    def __post_init__(self) -> None:
        at_least_one = ["global_batch_size", "micro_batch_size", "epochs", "max_seq_length", "log_interval",
                        "loss_chunk_size"]
        optional = ("max_steps", "eval_interval", "eval_max_batches", "save_interval", "keep_last")
        at_least_one += [name for name in optional if getattr(self, name) is not None]
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise UserError(f"--train.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--train.lr must be above 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--train.min_lr must be between 0 and --train.lr ({self.lr}), got {self.min_lr}")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"--train.{name} must be at least 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"--train.grad_clip must be above 0 (or null for no clipping), got {self.grad_clip}")

    def total_steps(self, n_examples: int) -> int:
        return self.max_steps or max(1, math.ceil(self.epochs * n_examples / self.global_batch_size))

    def is_eval_step(self, step: int, total_steps: int) -> bool:
        return step == total_steps or bool(self.eval_interval and step % self.eval_interval == 0)

    def is_save_step(self, step: int, total_steps: int) -> bool:
        """A resumable checkpoint is due after `step` (the final one is written after the loop)."""
        return step < total_steps and bool(self.save_interval and step % self.save_interval == 0)

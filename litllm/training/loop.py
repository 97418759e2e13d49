"""The mechanics of a training loop that research rarely touches: optimizer and schedule, the data order with its
exact resume position, loss normalization across micro-batches and devices, validation and the step log.

A task script owns its loop and objective (see litllm/finetune/lora.py) and calls these.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import sys
import types
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_args

import lightning_fabric as L
import torch
import torch.nn as nn
from tqdm import tqdm

from litllm.data import DataModule, TrainingDataset
from litllm.errors import UserError
from litllm.lora import clear_block_dropout, draw_block_dropout
from litllm.tokenizer import Tokenizer
from litllm.training.args import OptimizerName, TrainArgs
from litllm.training.fabric import data_parallel
from litllm.training.state import Progress, load_training_state

T = TypeVar("T")
R = TypeVar("R")
# (model, batch) -> (loss summed over the batch's units, metrics summed over them)
Objective = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def prepare_data(fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, max_seq_length: int
                 ) -> tuple[TrainingDataset, TrainingDataset]:
    """Tokenize the data once per machine (the first process writes any cache, the others then read it) and say
    what it holds, truncations included, so nothing is cut silently."""
    with fabric.rank_zero_first(local=True):
        train_data, val_data = data.setup(tokenizer, max_seq_length)
    fabric.print(f"Data: {data.summary()}")
    if not len(train_data):
        raise UserError("no training examples left; raise --train.max_seq_length or lower --data.val_split_fraction")
    return train_data, val_data


def build_optimizer(params, name: OptimizerName, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "AdamW":
        # fused: one pass over each parameter instead of a dozen elementwise ops; for SmolLM2's 135M weights on CPU
        # 0.11 s per step instead of 0.53 s (benchmarks/RESULTS.md), the same update
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    if name == "AdamW8bit":  # optimizer state in 8 bits: a quarter of AdamW's memory
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    raise UserError(f"--optimizer {name!r} is not one of {', '.join(get_args(OptimizerName))}")


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return (args.min_lr + (args.lr - args.min_lr) * cosine) / args.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_training(fabric: L.Fabric, model: nn.Module, optimizer: OptimizerName, args: TrainArgs, total_steps: int,
                   resume_from: Path | None):
    """Hand the model to Fabric, build optimizer and schedule (over `total_steps`), and restore their state when
    resuming.

    Returns (model, optimizer, scheduler, progress); the model is in training mode.
    """
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        compile_blocks_for_training(model)
    model = fabric.setup_module(model)
    optim = fabric.setup_optimizers(build_optimizer(model.parameters(), optimizer, args))
    scheduler = build_scheduler(optim, args, total_steps)
    progress = Progress()
    if resume_from:
        progress = load_training_state(fabric, resume_from, model, optim, scheduler)
        fabric.print(f"Resuming from {resume_from} (step {progress.step})")
    model.train()  # checkpoints load in eval mode; dropout and activation checkpointing need train mode
    return model, optim, scheduler, progress


def compile_blocks_for_training(model: nn.Module) -> None:
    """Regional torch.compile: each transformer block runs compiled while it trains (train mode, gradients on), and
    eagerly otherwise. Validation, reference scoring and sampling through the KV cache (eval mode or no_grad, other
    shapes and arguments) would each compile again, and decoding step by step recompile; they stay as they were.

    One compiled function serves every block (the block is its argument), so the compile costs one block's, twice:
    the first block's input needs no gradient (frozen embeddings), the others' do. LoRA dropout is drawn before each
    compiled block, outside its graph, in eager's order (lora.draw_block_dropout): losses equal eager's from the same
    seed, and each block is one graph.
    """
    forward = type(model.layers[0]).forward
    compiled = torch.compile(forward)

    def compiled_when_training(block: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (block.training and torch.is_grad_enabled()):
            return forward(block, x, *args, **kwargs)
        draw_block_dropout(block, x)
        try:
            return compiled(block, x, *args, **kwargs)
        finally:
            clear_block_dropout(block)

    for block in model.layers:
        # bound, so a deep copy of the model (checkpoint saving makes some) calls its own blocks
        block.forward = types.MethodType(compiled_when_training, block)


def step_batches(dataset: TrainingDataset, args: TrainArgs, seed: int, progress: Progress,
                 fabric: L.Fabric) -> Iterator[list[dict[str, torch.Tensor]]]:
    """For each optimizer step, this device's micro-batches; advances `progress` by one global batch.

    Each device gets its contiguous share of the step's examples (see step_indices), cut into micro-batches. So N
    devices see exactly the examples one device would, split N ways.
    """
    rank, world_size = data_parallel(fabric)  # a tensor-parallel group shares one batch
    per_device = args.global_batch_size // world_size
    if per_device * world_size != args.global_batch_size or per_device % args.micro_batch_size:
        raise UserError(
            f"--train.global_batch_size {args.global_batch_size} must be a multiple of "
            f"--train.micro_batch_size {args.micro_batch_size} x {world_size} data-parallel device(s)"
        )
    for indices in step_indices(len(dataset), args, seed, progress):
        mine = indices[rank * per_device:(rank + 1) * per_device]
        yield [dataset.collate([dataset[i] for i in mine[start:start + args.micro_batch_size]])
               for start in range(0, per_device, args.micro_batch_size)]


def step_indices(n_examples: int, args: TrainArgs, seed: int, progress: Progress) -> Iterator[list[int]]:
    """The examples of each optimizer step, in order; advances `progress` by one global batch per step.

    The order is a shuffle fixed by (seed, epoch). Each step takes the next global_batch_size examples, running on
    into the next epoch's order at the end of one.
    """
    order, order_epoch = None, None
    while True:
        indices: list[int] = []
        while len(indices) < args.global_batch_size:
            if order_epoch != progress.epoch:
                order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + progress.epoch))
                order_epoch = progress.epoch
            taken = order[progress.position:progress.position + args.global_batch_size - len(indices)].tolist()
            indices += taken
            progress.position += len(taken)
            if progress.position >= len(order):
                progress.epoch, progress.position = progress.epoch + 1, 0
        yield indices


def examples_to_come(n_examples: int, args: TrainArgs, seed: int, progress: Progress) -> list[int]:
    """The examples the steps from `progress` to the last one will train on (e.g. to score each once beforehand)."""
    used: set[int] = set()
    steps = step_indices(n_examples, args, seed, dataclasses.replace(progress))
    for _ in range(progress.step, args.total_steps(n_examples)):
        used.update(next(steps))
        if len(used) == n_examples:
            break
    return sorted(used)


def examples_validated(n_examples: int, args: TrainArgs) -> list[int]:
    """The validation examples `validate` scores (at most --train.eval_max_batches micro-batches)."""
    limit = n_examples if args.eval_max_batches is None else args.eval_max_batches * args.micro_batch_size
    return list(range(min(n_examples, limit)))


def fixed_micro_batches(needed: list[int], micro_batch_size: int, n_examples: int) -> list[list[int]]:
    """The fixed micro-batches (0 to m - 1, m to 2m - 1, ...) that hold the examples at `needed`: scoring examples in
    these, whichever of them a run needs, gives a resumed run bit for bit the numbers the uninterrupted one got."""
    starts = sorted({i // micro_batch_size * micro_batch_size for i in needed})
    return [list(range(start, min(start + micro_batch_size, n_examples))) for start in starts]


class StepUnits:
    """The units a loss is averaged over (target tokens, preference pairs) in one optimizer step, on all devices.

    Each micro-batch's loss is summed over its units and multiplied by `loss_scale` before backward: the gradient is
    then the mean over every unit of the step, however unevenly they fall between micro-batches and devices, as if
    the whole global batch ran at once. (Data parallelism averages gradients over devices; loss_scale multiplies
    their number back in.)
    """

    def __init__(self, fabric: L.Fabric, local_units: int) -> None:
        self.fabric = fabric
        total = fabric.all_reduce(torch.tensor(float(local_units), device=fabric.device), reduce_op="sum")
        self.total = max(1.0, float(total))
        self.loss_scale = fabric.world_size / self.total

    def mean(self, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Per-unit means over all devices of this device's sums (the loss and metrics of the step's micro-batches)."""
        return mean_over_devices(self.fabric, sums, self.total)


def mean_over_devices(fabric: L.Fabric, sums: dict[str, torch.Tensor | float], count: float) -> dict[str, float]:
    """Per-unit means over all devices of this device's sums; metrics named min_* / max_* (see add_to) come out as
    the extremes over all devices instead."""
    local = torch.tensor([float(value) for value in sums.values()], dtype=torch.float64, device=fabric.device)
    totals = fabric.all_reduce(local, reduce_op="sum")
    means = {name: float(total) / count for name, total in zip(sums, totals)}
    for op in ("min", "max"):
        for name in sums:
            if name.startswith(f"{op}_"):
                extreme = fabric.all_reduce(torch.tensor(float(sums[name]), device=fabric.device), reduce_op=op)
                means[name] = float(extreme)
    return means


def add_to(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Accumulate detached values into `sums` (kept as tensors: no device sync per micro-batch). Values are summed,
    except those named min_* or max_* (e.g. a reward model's min_reward), which keep the extreme."""
    for name, value in values.items():
        value = value.detach()
        if name not in sums:
            sums[name] = value
        elif name.startswith("min_"):
            sums[name] = torch.minimum(sums[name], value)
        elif name.startswith("max_"):
            sums[name] = torch.maximum(sums[name], value)
        else:
            sums[name] = sums[name] + value


def split_over_devices(fabric: L.Fabric, batches: list[T], score: Callable[[T], R]) -> list[R]:
    """`score(batch)` of every batch, on every device: each device scores every world_size-th batch, and the results
    are gathered to all, in order. Devices go in lockstep (FSDP's forward gathers weights from every device): one
    with no batch left in a round scores one of its own again and drops the result."""
    rank, world_size = data_parallel(fabric)  # a tensor-parallel group scores one batch together
    mine = list(range(rank, len(batches), world_size))
    results: dict[int, R] = {}
    for round_ in range(math.ceil(len(batches) / world_size)):
        index = mine[round_] if round_ < len(mine) else mine[0] if mine else 0
        result = score(batches[index])
        if round_ < len(mine):
            results[index] = result
    if fabric.world_size > 1:
        gathered: list[Any] = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = {index: result for part in gathered for index, result in part.items()}
    return [results[index] for index in range(len(batches))]


@torch.no_grad()
def validate(fabric: L.Fabric, model: nn.Module, val_data: TrainingDataset, args: TrainArgs, objective: Objective,
             count: Callable[[dict[str, torch.Tensor]], int]) -> dict[str, float]:
    """The objective's mean loss and metrics per unit over the validation set, named val_*: each device scores its
    share of the micro-batches (see split_over_devices), and every device gets the numbers one device would."""
    model.eval()
    validated = examples_validated(len(val_data), args)
    batches = [validated[start:start + args.micro_batch_size]
               for start in range(0, len(validated), args.micro_batch_size)]

    def score(indices: list[int]) -> tuple[dict[str, float], int]:
        batch = fabric.to_device(val_data.collate([val_data[j] for j in indices]))
        with fabric.autocast():
            loss, metrics = objective(model, batch)
        return {name: float(value) for name, value in {"loss": loss, **metrics}.items()}, count(batch)

    sums: dict[str, torch.Tensor] = {}
    units = 0
    for metrics, batch_units in split_over_devices(fabric, batches, score):  # summed in batch order, as one device
        add_to(sums, {name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()})
        units += batch_units
    model.train()
    return {f"val_{name}": float(total) if name.startswith(("min_", "max_")) else float(total) / max(units, 1)
            for name, total in sums.items()}


class StepLog:
    """What a run reports: a progress bar (or, where stderr is not a terminal, one plain line per log), and the
    metrics, with tokens/s over the steps since the last log, peak memory and, with `flops_per_token` on a device
    whose peak FLOP/s Lightning knows (CUDA GPUs; not CPUs), the model FLOPs utilization `mfu`."""

    def __init__(self, fabric: L.Fabric, args: TrainArgs, total_steps: int, start_step: int,
                 flops_per_token: float | None = None) -> None:
        self.fabric, self.args, self.total_steps = fabric, args, total_steps
        self.peak_flops = available_flops(fabric) if flops_per_token else None
        self.flops_per_token = flops_per_token
        self.recent: deque[tuple[int, float]] = deque(maxlen=args.log_interval)  # (tokens, seconds) per step
        self.bar = tqdm(total=total_steps, initial=start_step, desc="Training",
                        disable=not sys.stderr.isatty() or fabric.global_rank > 0)

    def step(self, step: int, metrics: dict[str, float], tokens: int, seconds: float) -> None:
        """After an optimizer step: its `metrics`, the `tokens` this device processed and the `seconds` the step took
        (validation and saving left out). Training metrics are logged every --train.log_interval steps and at the
        last one, validation metrics (val_*) whenever there are some."""
        self.recent.append((tokens * data_parallel(self.fabric)[1], seconds))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if step % self.args.log_interval and step != self.total_steps:
            metrics = {name: value for name, value in metrics.items() if name.startswith("val_")}
            if metrics:
                self.log(step, metrics)
            return
        tokens_per_sec = sum(t for t, _ in self.recent) / max(sum(s for _, s in self.recent), 1e-9)
        metrics = {**metrics, "tokens_per_sec": tokens_per_sec, "peak_memory_gb": peak_memory_gb(self.fabric.device)}
        if self.peak_flops:  # tokens/s is over all devices, so is the peak
            metrics["mfu"] = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.fabric.world_size)
        self.log(step, metrics)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics to the loggers (and, where stderr is not a terminal, a plain line)."""
        self.fabric.log_dict({"step": step, **metrics}, step=step)
        if not sys.stderr.isatty():  # CI and pipes get a plain line per log instead of a bar
            self.fabric.print(" ".join(f"{k} {v:.4g}" for k, v in {"step": step, **metrics}.items()))

    def close(self) -> None:
        self.bar.close()
        for logger in self.fabric.loggers:
            logger.finalize("success")


def training_flops_per_token(model: nn.Module, seq_length: int) -> float:
    """Model FLOPs of one training token, forward and backward (PaLM, arXiv 2204.02311, appendix B):
    6 N + 12 n_layers n_heads head_dim seq_length.

    N counts the weights that multiply activations: every matrix but the embedding table, which is a lookup, with
    lm_head counted even when it shares that table (norm weights and biases are elementwise, left out). The second
    term is attention's two matmuls (QK^T and the weighted sum of V) over the whole causal window, as PaLM counts
    them. LoRA runs count as full training (the frozen weights skip their weight gradients, so their true FLOPs are
    nearer 4 N).
    """
    config = model.config
    n_matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed_tokens.weight")
    if config.tie_embeddings:
        n_matmul += config.vocab_size * config.hidden_size
    return 6 * n_matmul + 12 * config.n_layers * config.n_heads * config.head_dim * seq_length


def available_flops(fabric: L.Fabric) -> float | None:
    """The device's peak FLOP/s in the training precision, from Lightning's table (None where unknown, e.g. CPU)."""
    from lightning_fabric.utilities.throughput import get_available_flops

    precision = fabric.strategy.precision.precision
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else torch.float32
    return get_available_flops(fabric.device, dtype)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: peak RSS

"""What every training script shares: settings, Fabric, optimizer, schedule, loss, the loop, save/resume."""
from __future__ import annotations

import copy
import itertools
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from litllm.checkpoint import atomic_dir
from litllm.errors import UserError

STATE_FILE = "training_state.pt"


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
        save_interval: write a resumable checkpoint every N steps (None: only the final one).
        activation_checkpointing: recompute each block's activations in backward to save memory.
        loss_chunk_size: tokens per cross-entropy chunk, so the full fp32 logits never exist at once.
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
    save_interval: int | None = None
    activation_checkpointing: bool = False
    loss_chunk_size: int = 1024

    def total_steps(self, n_examples: int) -> int:
        return self.max_steps or max(1, math.ceil(self.epochs * n_examples / self.global_batch_size))


# ------------------------------------------------------------------------------------------ setup


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_strategy(strategy: str, optimizer: str, quantize: str | None = None) -> None:
    """Refuse, before any process starts, what FSDP cannot shard: bitsandbytes' quantized weights and 8-bit state."""
    if strategy == "fsdp" and quantize:
        raise UserError(f"--quantize {quantize} does not work with --strategy fsdp (bitsandbytes weights cannot be "
                        f"sharded); use --strategy ddp, or no --quantize")
    if strategy == "fsdp" and optimizer == "AdamW8bit":
        raise UserError("--optimizer AdamW8bit does not work with --strategy fsdp (its 8-bit state cannot be "
                        "sharded); use --optimizer AdamW")


def setup_fabric(out_dir: Path, precision: str | None, logger: str, devices: int = 1, num_nodes: int = 1,
                 strategy: Literal["auto", "ddp", "fsdp"] = "auto") -> L.Fabric:
    """Fabric with the chosen precision, devices and strategy, and a logger writing under out_dir/logs.

    Strategies: auto (one device), ddp (a replica of the model per device), fsdp (FullyShardedDataParallel).

    Launched by `fabric run`, `torchrun` or SLURM, Fabric takes ranks and addresses from their environment; run
    plainly with devices > 1, it starts the other processes itself.
    """
    import importlib.util

    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(logger)
    if needs and importlib.util.find_spec(needs) is None:
        raise UserError(f"--logger {logger} needs the {needs} package: pip install {needs}")
    if logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger
    loggers = {
        # flushed at every log, so a killed run keeps its metrics up to the kill
        "csv": lambda: CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=1),
        "tensorboard": lambda: TensorBoardLogger(out_dir, name="logs"),
        "wandb": lambda: WandbLogger(project="litllm", save_dir=out_dir),
    }
    if logger not in loggers:
        raise UserError(f"--logger {logger!r} is not one of csv, tensorboard, wandb")
    try:
        fabric = L.Fabric(devices=devices, num_nodes=num_nodes,
                          strategy=FullySharded(devices * num_nodes) if strategy == "fsdp" else strategy,
                          precision=precision or default_precision(), loggers=[loggers[logger]()])
    except ValueError as e:  # Fabric's message lists the valid precisions
        raise UserError(f"--precision: {' '.join(str(e).split())}") from None
    fabric.launch()
    return fabric


class FullySharded(ModelParallelStrategy):
    """FSDP through Fabric: torch's `fully_shard` (FSDP2) on each transformer block, then on the model (embeddings,
    final norm, lm_head). Each of the N processes holds 1/N of the weights, gradients and optimizer state, and
    gathers one block's weights at a time for its forward and backward.

    (Fabric's FSDPStrategy wraps the older FSDP1 API, which runs on GPUs only; FSDP2 also runs on CPUs with gloo.)
    Remembers the model's unsharded structure, without data, into which checkpoints gather the full weights.
    """

    def __init__(self, world_size: int) -> None:
        super().__init__(self.shard_blocks, data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=False)
        self.layout: nn.Module | None = None

    def shard_blocks(self, model: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        self.layout = empty_copy(model)
        mesh = device_mesh["data_parallel"]
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model


def empty_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure, without its data."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def model_dtype(fabric: L.Fabric) -> torch.dtype:
    """The dtype to load weights in: the training dtype for "-true" precisions, float32 for mixed ones."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(fabric.strategy.precision.precision,
                                                                      torch.float32)


def prepare_data(fabric: L.Fabric, data, tokenizer, max_seq_length: int):
    """Tokenize the data once; say how much was truncated, so nothing is cut silently."""
    train_data, val_data = data.setup(tokenizer, max_seq_length)
    fabric.print(f"Data: {len(train_data)} training and {len(val_data)} validation sequences; "
                 f"{data.num_truncated} of {data.num_examples} examples truncated to {max_seq_length} tokens"
                 + (f" ({data.num_dropped} left out: no response token left)" if data.num_dropped else ""))
    if not len(train_data):
        raise UserError("no training examples left; raise --train.max_seq_length or lower --data.val_split_fraction")
    return train_data, val_data


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


def build_optimizer(params, name: str, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    if name == "AdamW8bit":  # optimizer state in 8 bits: a quarter of AdamW's memory
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    raise UserError(f"--optimizer {name!r} is not one of AdamW, AdamW8bit")


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return (args.min_lr + (args.lr - args.min_lr) * cosine) / args.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_training(fabric: L.Fabric, model, optimizer: str, args: TrainArgs, n_examples: int,
                   resume_from: Path | None):
    """Hand the model to Fabric, build optimizer and schedule, and restore their state when resuming."""
    model.activation_checkpointing = args.activation_checkpointing
    model = fabric.setup_module(model)
    optim = fabric.setup_optimizers(build_optimizer(model.parameters(), optimizer, args))
    scheduler = build_scheduler(optim, args, args.total_steps(n_examples))
    progress = Progress()
    if resume_from:
        progress = load_training_state(fabric, resume_from, model, optim, scheduler)
        fabric.print(f"Resuming from {resume_from} (step {progress.step})")
    return model, optim, scheduler, progress


# ------------------------------------------------------------------------------------------ loss


def chunked_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens (labels != -100).

    Only target positions go through lm_head, a chunk at a time: the float32 logits of a 50k-150k
    vocabulary exist for one chunk only, never for the whole batch.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))  # position t predicts token t + 1
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    lm_head = model.lm_head
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return LinearCrossEntropy.apply(hidden, lm_head.weight, targets, chunk_size)
    # lm_head is wrapped (LoRA on lm_head): checkpoint each chunk, recomputing its logits in backward
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        total = total + checkpoint(_chunk_loss, lm_head, h, t, use_reentrant=False)
    return total


def _chunk_loss(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) with its gradients computed chunk by chunk in forward.

    d loss / d logits = softmax(logits) - onehot(target) is known as soon as a chunk's logits are, so the
    gradients for hidden (and weight) are accumulated right away and the logits freed: no logits are kept
    for backward and none are recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False under torch.no_grad()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = (h @ weight.T).float()  # (chunk, vocab)
            log_z = logits.logsumexp(dim=-1)
            total += (log_z - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if needs_grad:
                grad_logits = logits.sub_(log_z.unsqueeze(1)).exp_()  # softmax, in place
                grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1
                grad_logits = grad_logits.to(h.dtype)
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def sft_loss(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   document_ids=batch.get("document_ids"), return_hidden=True)
    return chunked_cross_entropy(model, hidden, batch["labels"], chunk_size)


class NextTokenLoss:
    """The objective of fine-tuning and pretraining: cross-entropy of each target token.

    An objective is what `fit` minimizes: `objective(model, batch)` returns the loss *summed* over the
    batch's units and a dict of metric sums; `objective.count(batch)` the number of units (here target
    tokens; preference pairs for DPO). fit divides by the units of the whole optimizer step, over all
    devices, so gradient accumulation and data parallelism equal one large batch.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss(model, batch, self.chunk_size), {}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)


# ------------------------------------------------------------------------------------------ data order


@dataclass
class Progress:
    """Where training is: optimizer steps done and the position in the data (saved for exact resume)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of this epoch already consumed


def step_batches(dataset, args: TrainArgs, seed: int, progress: Progress, rank: int = 0,
                 world_size: int = 1) -> Iterator[list[dict]]:
    """For each optimizer step, this device's micro-batches; advances `progress` by one global batch.

    The order is a shuffle fixed by (seed, epoch). Each step takes the next global_batch_size examples
    (running on into the next epoch's order at the end of one); device `rank` gets its contiguous share,
    cut into micro-batches. So N devices see exactly the examples one device would, split N ways.
    """
    per_device = args.global_batch_size // world_size
    if per_device * world_size != args.global_batch_size or per_device % args.micro_batch_size:
        raise UserError(
            f"--train.global_batch_size {args.global_batch_size} must be a multiple of "
            f"--train.micro_batch_size {args.micro_batch_size} x {world_size} device(s)"
        )
    order, order_epoch = None, None
    while True:
        indices: list[int] = []
        while len(indices) < args.global_batch_size:
            if order_epoch != progress.epoch:
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + progress.epoch))
                order_epoch = progress.epoch
            taken = order[progress.position:progress.position + args.global_batch_size - len(indices)].tolist()
            indices += taken
            progress.position += len(taken)
            if progress.position >= len(order):
                progress.epoch, progress.position = progress.epoch + 1, 0
        mine = indices[rank * per_device:(rank + 1) * per_device]
        yield [dataset.collate([dataset[i] for i in mine[start:start + args.micro_batch_size]])
               for start in range(0, per_device, args.micro_batch_size)]


# ------------------------------------------------------------------------------------------ the loop


def fit(
    fabric: L.Fabric,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_data,
    val_data,
    args: TrainArgs,
    seed: int,
    out_dir: Path,
    save_weights: Callable[[Path, nn.Module], None],
    progress: Progress,
    objective=None,
    flops_per_token: float | None = None,
) -> None:
    """forward, loss, backward, step; log, validate, save. `save_weights(dir, model)` writes the model's files.

    `objective` is what is minimized (default: NextTokenLoss); its metrics are logged beside the loss.
    With `flops_per_token` (see training_flops_per_token) the model FLOPs utilization `mfu` is logged too,
    on devices whose peak FLOP/s Lightning knows (CUDA GPUs, TPUs; not CPUs).
    """
    objective = objective or NextTokenLoss(args.loss_chunk_size)
    peak_flops = available_flops(fabric) if flops_per_token else None
    total_steps = args.total_steps(len(train_data))
    model.train()  # checkpoints load in eval mode; dropout and activation checkpointing need train mode
    batches = step_batches(train_data, args, seed, progress, fabric.global_rank, fabric.world_size)
    tokens, started = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=progress.step, desc="Training",
               disable=not sys.stderr.isatty() or fabric.global_rank > 0)
    while progress.step < total_steps:
        micro = next(batches)
        step_metrics = accumulate_gradients(fabric, model, micro, objective)
        tokens += sum(batch["input_ids"].numel() for batch in micro) * fabric.world_size
        if args.grad_clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4f}")

        metrics = {}
        if progress.step % args.log_interval == 0 or progress.step == total_steps:
            elapsed = time.perf_counter() - started
            metrics.update(step_metrics, lr=scheduler.get_last_lr()[0], tokens_per_sec=tokens / elapsed,
                           peak_memory_gb=peak_memory_gb(fabric.device))
            if peak_flops:  # tokens/s is over all devices, so is the peak
                metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token / (peak_flops * fabric.world_size)
        if val_data is not None and len(val_data) and (
            (args.eval_interval and progress.step % args.eval_interval == 0) or progress.step == total_steps
        ):
            val_metrics = validate(fabric, model, val_data, args, objective)
            metrics.update({f"val_{name}": value for name, value in val_metrics.items()})
            if isinstance(objective, NextTokenLoss):  # perplexity: exp of the mean token cross-entropy
                metrics["val_ppl"] = perplexity(metrics["val_loss"])
            fabric.print(f"step {progress.step}: val loss {metrics['val_loss']:.4f}"
                         + (f", val perplexity {metrics['val_ppl']:.2f}" if "val_ppl" in metrics else ""))
        if metrics:
            fabric.log_dict({"step": progress.step, **metrics}, step=progress.step)
            if not sys.stderr.isatty():  # CI and pipes get a plain line per log instead of a bar
                fabric.print(" ".join(f"{k} {v:.4g}" for k, v in {"step": progress.step, **metrics}.items()))
        if args.save_interval and progress.step % args.save_interval == 0 and progress.step < total_steps:
            save_training_checkpoint(fabric, out_dir / f"step-{progress.step:06d}", save_weights, model, optimizer,
                                     scheduler, progress)
    bar.close()
    save_training_checkpoint(fabric, out_dir / "final", save_weights, model, optimizer, scheduler, progress)
    for logger in fabric.loggers:
        logger.finalize("success")


def accumulate_gradients(fabric: L.Fabric, model, micro_batches: list[dict], objective) -> dict[str, float]:
    """Forward and backward over this device's micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the units (target tokens, pairs) of the whole step on all
    devices, and multiplied by the device count because data parallelism averages gradients: the result
    equals one large batch, however unevenly the units fall between micro-batches and devices.
    Returns the step's mean loss and metrics over all devices.
    """
    n_local = float(sum(objective.count(batch) for batch in micro_batches))
    n_units = fabric.all_reduce(torch.tensor(n_local, device=fabric.device), reduce_op="sum")
    n_units = max(1.0, float(n_units))
    sums: dict[str, float] = {"loss": 0.0}
    for i, batch in enumerate(micro_batches):
        batch = {k: fabric.to_device(v) for k, v in batch.items()}
        # gradients sync across devices only on the last micro-batch (DDP decides in forward, FSDP in backward)
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            with fabric.autocast():
                loss, metrics = objective(model, batch)
            fabric.backward(loss * (fabric.world_size / n_units))
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
    return mean_over_devices(fabric, sums, n_units)


def mean_over_devices(fabric: L.Fabric, sums: dict[str, float], count: float) -> dict[str, float]:
    totals = fabric.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=fabric.device),
                               reduce_op="sum")
    return {name: float(total) / count for name, total in zip(sums, totals)}


@torch.no_grad()
def validate(fabric: L.Fabric, model, val_data, args: TrainArgs, objective) -> dict[str, float]:
    """Mean loss and metrics over the validation set (every device computes the same numbers)."""
    model.eval()
    sums: dict[str, float] = {"loss": 0.0}
    count = 0
    for i in range(0, len(val_data), args.micro_batch_size):
        if args.eval_max_batches is not None and i // args.micro_batch_size >= args.eval_max_batches:
            break
        batch = val_data.collate([val_data[j] for j in range(i, min(i + args.micro_batch_size, len(val_data)))])
        batch = {k: fabric.to_device(v) for k, v in batch.items()}
        with fabric.autocast():
            loss, metrics = objective(model, batch)
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        count += objective.count(batch)
    model.train()
    return {name: total / max(count, 1) for name, total in sums.items()}


def perplexity(mean_cross_entropy: float) -> float:
    return math.exp(mean_cross_entropy) if mean_cross_entropy < 700 else math.inf  # math.exp overflows past ~709


def training_flops_per_token(model: nn.Module, seq_length: int) -> float:
    """Model FLOPs of one training token, forward and backward (PaLM, arXiv 2204.02311, appendix B):
    6 N + 12 n_layers n_heads head_dim seq_length.

    N counts the weights that multiply activations: every matrix but the embedding table, which is a lookup, with
    lm_head counted even when it shares that table (norm weights and biases are elementwise, left out). The second term is attention's two matmuls (QK^T and
    the weighted sum of V) over the whole causal window, as PaLM counts them. LoRA runs count as full training
    (the frozen weights skip their weight gradients, so their true FLOPs are nearer 4 N).
    """
    config = model.config
    n_matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed_tokens.weight")
    if config.tie_embeddings:
        n_matmul += config.vocab_size * config.hidden_size
    return 6 * n_matmul + 12 * config.n_layers * config.n_heads * config.head_dim * seq_length


def available_flops(fabric: L.Fabric) -> float | None:
    """The device's peak FLOP/s in the training precision, from Lightning's table (None where unknown, e.g. CPU)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    precision = fabric.strategy.precision.precision
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else torch.float32
    return get_available_flops(fabric.device, dtype)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: peak RSS


# ------------------------------------------------------------------------------------------ save / resume


def save_training_checkpoint(fabric: L.Fabric, directory: Path, save_weights, model, optimizer, scheduler,
                             progress: Progress) -> None:
    """Weights (HF dir or PEFT adapter) plus everything an exact resume needs, in one atomic directory.

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

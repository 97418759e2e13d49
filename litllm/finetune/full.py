"""Full fine-tuning (every weight trains): a Lightning Fabric script.

    litllm finetune full checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data JSON --data.json_path my.jsonl
    python full.py --config full.yaml      # after `litllm cp finetune/full full.py`

setup() builds Fabric, the model, the data and the optimizer; fit() is the training loop and next_token_loss() the
objective, both here to edit. The mechanics they call (loss normalization across micro-batches and devices,
checkpoints, resume, validation) live in litllm.training.
Outputs: Hugging Face model dirs under out_dir (step-NNNNNN/ and final/), logs under out_dir/logs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning_fabric as L
import torch
import torch.nn as nn

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, write_model_files
from litllm.config import Config
from litllm.data import Alpaca, SFTData, TrainingDataset
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import check_strategy, check_tensor_parallel, load_for_training, setup_fabric
from litllm.training.loop import StepLog, StepUnits, prepare_data, setup_training, step_batches, validate
from litllm.training.losses import count_targets, cross_entropy_sum
from litllm.training.state import Checkpoints, Progress, prepare_out_dir


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/full"),
    data: SFTData | None = None,
    train: TrainArgs = TrainArgs(lr=2e-5),
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    tensor_parallel: int = 1,
    precision: str | None = None,
    optimizer: OptimizerName = "AdamW",
    logger: LoggerName = "csv",
    seed: int = 1337,
    resume: bool | Literal["auto"] = False,
    overwrite: bool = False,
) -> Path:
    """Fine-tune every weight of a model.

    Args:
        checkpoint_dir: the Hugging Face model dir to fine-tune.
        out_dir: where checkpoints (HF model dirs with training state) and logs go.
        data: the fine-tuning data (default: Alpaca from the hub).
        train: training loop settings.
        devices: devices per node.
        num_nodes: nodes (machines); launch with torchrun, SLURM or `fabric run`.
        strategy: auto (one device); ddp (a replica of the model per device, each taking its share of every
            global batch); fsdp (as ddp, but each device holds only its shard of the weights, gradients and
            optimizer state; each transformer block is gathered just for its forward and backward).
        tensor_parallel: split each transformer block's weights over groups of this many devices (Megatron-style
            tensor parallelism; it must divide the devices and the model's heads and MLP width); the groups shard
            with FSDP. 1: no splitting. Tested on CPU; see tutorials/pretrain.md.
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed of the run: data order, new weights and adapters, dropout.
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
        overwrite: start over in an out_dir that holds a run, deleting its checkpoints and logs (nothing else).
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_strategy(strategy, optimizer)
    check_tensor_parallel(Config.from_hf(checkpoint_dir), tensor_parallel, devices * num_nodes, strategy)
    data = data or Alpaca()
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy, tensor_parallel)
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite, inputs=[checkpoint_dir, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length)

    # a resumed run reads its weights from its own checkpoint, which is a complete HF model dir
    model = load_for_training(fabric, resume_from or checkpoint_dir)
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train,
                                                       train.total_steps(len(train_data)), resume_from)

    def save_weights(directory: Path, trained: nn.Module) -> None:
        write_model_files(trained, directory)
        copy_tokenizer_files(checkpoint_dir, directory)

    with Checkpoints(fabric, out_dir, save_weights, train) as checkpoints:
        fit(fabric, model, optim, scheduler, progress, train_data, val_data, train, seed, checkpoints)
    final = out_dir / "final"
    fabric.print(f"Saved the fine-tuned model to {final}\nTry it: litllm chat {final}")
    return final


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """The objective: cross-entropy of every target token (the response, with --data.mask_prompt), summed.

    Summed rather than averaged, so StepUnits can make a step's gradient the mean over all of its target tokens.
    """
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   document_ids=batch.get("document_ids"), return_hidden=True)  # (B, T, hidden_size)
    return cross_entropy_sum(model.lm_head, hidden, batch["labels"], chunk_size)


def fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: TrainingDataset, val_data: TrainingDataset, args: TrainArgs, seed: int,
        checkpoints: Checkpoints) -> None:
    """The training loop: per optimizer step, forward and backward over this device's micro-batches, then one
    optimizer step; log, validate and save at their intervals, and save `final` at the end."""
    total_steps = args.total_steps(len(train_data))
    log = StepLog(fabric, args, total_steps, progress.step)

    def objective(model, batch):  # validation's view of the loss: (summed loss, summed metrics)
        return next_token_loss(model, batch, args.loss_chunk_size), {}

    batches = step_batches(train_data, args, seed, progress, fabric)
    while progress.step < total_steps:
        micro_batches = next(batches)
        started = time.perf_counter()
        units = StepUnits(fabric, sum(count_targets(batch) for batch in micro_batches))
        loss_sum = torch.zeros((), device=fabric.device)
        for i, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            # gradients sync across devices on the last micro-batch only (DDP decides in forward, FSDP in backward)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                with fabric.autocast():
                    loss = next_token_loss(model, batch, args.loss_chunk_size)
                fabric.backward(loss * units.loss_scale)
            loss_sum += loss.detach()
        if args.grad_clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1

        metrics = {**units.mean({"loss": loss_sum}), "lr": scheduler.get_last_lr()[0]}
        seconds = time.perf_counter() - started
        if len(val_data) and args.is_eval_step(progress.step, total_steps):
            metrics |= validate(fabric, model, val_data, args, objective, count_targets)
            fabric.print(f"step {progress.step}: val loss {metrics['val_loss']:.4f}")
        log.step(progress.step, metrics, tokens=sum(b["input_ids"].numel() for b in micro_batches), seconds=seconds)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)

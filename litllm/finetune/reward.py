"""Reward models from preference pairs (Bradley-Terry, as InstructGPT's, arXiv 2203.02155): a Lightning Fabric script.

    litllm finetune reward checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Preference --data.json_path pairs.jsonl
    python reward.py --config reward.yaml      # after `litllm cp finetune/reward reward.py`

A reward model scores a whole conversation with one number: the transformer with a scalar head (RewardGPT in
litllm.model: the final hidden state of the last token times a learned vector, `score`). It learns from preference
pairs to score the chosen conversation above the rejected one: loss = -log sigmoid(r_chosen - r_rejected - margin),
with a pair's optional margin (--data.margin_key), plus center_rewards_coefficient * (r_chosen + r_rejected)^2 when
set, which keeps rewards near 0 (arXiv 2312.09244); TRL's RewardTrainer computes the same.

setup() builds Fabric, the model, the data and the optimizer; fit() is the training loop and reward_objective() with
bradley_terry_loss() the objective, all here to edit. The mechanics they call (loss normalization across micro-batches
and devices, checkpoints, resume, validation) live in litllm.training.
Outputs under out_dir (step-NNNNNN/ and final/): PEFT adapter dirs of task type SEQ_CLS, the score head saved whole
with them (or, with --full true, Hugging Face model dirs that AutoModelForSequenceClassification loads); logs under
out_dir/logs. Score text with either: `from litllm import RewardModel`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import lightning_fabric as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.data import Preference, PreferenceDataset
from litllm.errors import UserError
from litllm.lora import LoRAConfig, apply_lora, count_parameters, load_adapter, save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import check_strategy, model_dtype, setup_fabric
from litllm.training.loop import StepLog, StepUnits, add_to, prepare_data, setup_training, step_batches, validate
from litllm.training.state import Checkpoints, Progress, prepare_out_dir


@dataclass
class RewardArgs:
    """The reward model's loss (the `--reward.*` options).

    Attributes:
        center_rewards_coefficient: adds this times (r_chosen + r_rejected)^2 per pair, pulling the rewards' mean
            towards 0 (TRL's option of the same name; 0.01 is the value its docs suggest). None: off.
    """

    center_rewards_coefficient: float | None = None

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise UserError(f"--reward.center_rewards_coefficient must be 0 or more, "
                            f"got {self.center_rewards_coefficient}")


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/reward"),
    data: Preference | None = None,
    train: TrainArgs = TrainArgs(lr=1e-4, global_batch_size=16, micro_batch_size=2),
    reward: RewardArgs = RewardArgs(),
    lora: LoRAConfig = LoRAConfig(),
    full: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    precision: str | None = None,
    optimizer: OptimizerName = "AdamW",
    logger: LoggerName = "csv",
    seed: int = 1337,
    resume: bool | Literal["auto"] = False,
    overwrite: bool = False,
) -> Path:
    """Train a reward model on preference pairs: a new score head and LoRA adapters by default, every weight with
    --full true.

    Args:
        checkpoint_dir: the Hugging Face model dir to start from (usually the SFT or instruct model whose answers
            the reward model will score).
        out_dir: where adapters (or model dirs), training state and logs go.
        data: the preference pairs (--data Preference --data.json_path FILE), optionally with a margin per pair.
        train: training loop settings; batch sizes count pairs (a micro-batch of N pairs is 2N sequences).
        reward: the loss.
        lora: adapter settings (unused with --full true); the score head always trains whole.
        full: train every weight instead of LoRA adapters (use a lower --train.lr, e.g. 1e-5); outputs are Hugging
            Face model dirs.
        devices: devices per node.
        num_nodes: nodes (machines); launch with torchrun, SLURM or `fabric run`.
        strategy: auto (one device); ddp (a replica of the model per device, each taking its share of every
            global batch); fsdp (as ddp, but each device holds only its shard of the weights, gradients and
            optimizer state; each transformer block is gathered just for its forward and backward).
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed of the run: data order, new weights and adapters, dropout.
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
        overwrite: start over in an out_dir that holds a run, deleting its checkpoints and logs (nothing else).
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_strategy(strategy, optimizer)
    data = data or Preference()
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy)
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite, inputs=[checkpoint_dir, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length)

    model = load_model(resume_from if full and resume_from else checkpoint_dir, dtype=model_dtype(fabric),
                       device=fabric.device, reward=True)
    set_pad_id(model, train_data, val_data)
    if full:
        model.requires_grad_(True)
    elif resume_from:
        lora = load_adapter(model, resume_from, checkpoint_dir)
    else:
        apply_lora(model, lora)
    fabric.print(f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, trainable=False):,}")
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train,
                                                       train.total_steps(len(train_data)), resume_from)

    def save_weights(directory: Path, trained: nn.Module) -> None:
        if full:
            write_model_files(trained, directory)
        else:
            save_adapter(trained, lora, directory, base_checkpoint=checkpoint_dir)
        copy_tokenizer_files(checkpoint_dir, directory)

    with Checkpoints(fabric, out_dir, save_weights, train) as checkpoints:
        fit(fabric, model, optim, scheduler, progress, train_data, val_data, train, reward, seed, checkpoints)
    final = out_dir / "final"
    load = f"RewardModel.load('{final}')" if full else f"RewardModel.load('{checkpoint_dir}', adapter='{final}')"
    fabric.print(f"Saved the reward model to {final}\nScore text with it: from litllm import RewardModel; {load}"
                 ".score([...])")
    return final


def set_pad_id(model: nn.Module, *datasets: PreferenceDataset) -> None:
    """Pad batches with the id the model reads rewards by (the last token that is not padding; see RewardGPT):
    config.json's pad_token_id, or where it has none the tokenizer's pad (or EOS) token, then written into the
    model's config, so the saved reward model reads the same token in transformers."""
    if model.config.pad_token_id is None:
        model.config = replace(model.config, pad_token_id=datasets[0].pad_id)
    for dataset in datasets:
        dataset.pad_id = model.config.pad_token_id


def reward_objective(model: nn.Module, batch: dict[str, torch.Tensor], args: RewardArgs
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective: the loss summed over a batch of pairs (see PreferenceDataset.collate: the chosen sequences,
    then the rejected ones), and the metrics as TRL's RewardTrainer names them, summed over the pairs (min_* and
    max_* are extremes: see litllm.training.loop.add_to)."""
    chosen, rejected = model(batch["input_ids"]).chunk(2)
    losses = bradley_terry_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
    both = torch.cat([chosen, rejected]).detach()
    return losses.sum(), {
        "accuracy": (chosen > rejected).float().sum(),
        "margin": (chosen - rejected).detach().sum(),
        "mean_reward": both.sum() / 2,  # per pair: the mean of its two rewards
        "min_reward": both.min(),
        "max_reward": both.max(),
    }


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair losses (B,) from the rewards of the chosen and rejected sequences (B,): -log P(chosen preferred) under
    the Bradley-Terry model, P = sigmoid(r_chosen - r_rejected - margin)."""
    losses = -F.logsigmoid(chosen - rejected - (0 if margin is None else margin))
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """The units the loss is averaged over: pairs, each two rows of the batch."""
    return batch["input_ids"].size(0) // 2


def fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: PreferenceDataset, val_data: PreferenceDataset, args: TrainArgs, reward: RewardArgs, seed: int,
        checkpoints: Checkpoints) -> None:
    """The training loop: per optimizer step, forward and backward over this device's micro-batches of pairs, then
    one optimizer step; log, validate and save at their intervals, and save `final` at the end."""
    total_steps = args.total_steps(len(train_data))
    log = StepLog(fabric, args, total_steps, progress.step)

    def objective(model, batch):
        return reward_objective(model, batch, reward)

    batches = step_batches(train_data, args, seed, progress, fabric)
    while progress.step < total_steps:
        micro_batches = next(batches)
        started = time.perf_counter()
        units = StepUnits(fabric, sum(count_pairs(batch) for batch in micro_batches))
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            # gradients sync across devices on the last micro-batch only (DDP decides in forward, FSDP in backward)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                with fabric.autocast():
                    loss, metrics = reward_objective(model, batch, reward)
                fabric.backward(loss * units.loss_scale)
            add_to(sums, {"loss": loss, **metrics})
        if args.grad_clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1

        metrics = {**units.mean(sums), "lr": scheduler.get_last_lr()[0]}
        seconds = time.perf_counter() - started
        if len(val_data) and args.is_eval_step(progress.step, total_steps):
            metrics |= validate(fabric, model, val_data, args, objective, count_pairs)
            fabric.print(f"step {progress.step}: val loss {metrics['val_loss']:.4f}, "
                         f"val accuracy {metrics['val_accuracy']:.3f}")
        log.step(progress.step, metrics, tokens=sum(b["input_ids"].numel() for b in micro_batches), seconds=seconds)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)

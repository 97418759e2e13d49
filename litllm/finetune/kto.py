"""Kahneman-Tversky Optimization (KTO, arXiv 2402.01306): a Lightning Fabric script.

    litllm finetune kto checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Unpaired --data.json_path feedback.jsonl
    litllm finetune kto checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Preference --data.json_path pairs.jsonl
    python kto.py --config kto.yaml      # after `litllm cp finetune/kto kto.py`

KTO learns from single completions labelled desirable (thumbs up) or undesirable (thumbs down): no pairs needed.
Each completion's implicit reward is its log-ratio r = log pi(y|x) - log ref(y|x), summed over the completion, measured
against a reference point z, an estimate of KL(pi || ref). A desirable completion costs
desirable_weight * (1 - sigmoid(beta * (r - z))), an undesirable one undesirable_weight * (1 - sigmoid(beta * (z - r))).
z is TRL's estimate: each example's prompt is also scored with another example's completion (its KL partner, fixed
when the data is set up), and z is the mean over a micro-batch of those mismatched log-ratios (see kl_estimate).

The reference is the model as training starts. With fresh LoRA adapters (the default) that is the base model, so it
is the same model with its adapters disabled: no second copy in memory. Otherwise (--full true, or --adapter to go on
from an SFT adapter) the reference log-probs of each example the run will use, and of its KL sequence, are computed
once, before training.

setup() builds Fabric, the model, the data and the optimizer; fit() is the training loop and kto_objective() with
kto_loss() the objective, all here to edit. The mechanics they call (loss normalization across micro-batches and
devices, checkpoints, resume, validation) live in litllm.training.
Outputs: PEFT adapter dirs (or, with --full true, Hugging Face model dirs) under out_dir (step-NNNNNN/ and final/),
logs under out_dir/logs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning_fabric as L
import torch
import torch.nn as nn
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.data import Preference, Unpaired, UnpairedDataset
from litllm.errors import UserError
from litllm.lora import LoRAConfig, apply_lora, count_parameters, disable_adapters, load_adapter, merge_lora, \
    save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import check_strategy, model_dtype, setup_fabric
from litllm.training.loop import (StepLog, StepUnits, add_to, examples_to_come, examples_validated,
                                  fixed_micro_batches, prepare_data, setup_training, split_over_devices, step_batches,
                                  validate)
from litllm.training.losses import sequence_logprobs
from litllm.training.state import Checkpoints, Progress, prepare_out_dir, saved_progress


@dataclass
class KTOArgs:
    """The KTO loss (the `--kto.*` options).

    Attributes:
        beta: how far the policy may move from the reference: the temperature of the implicit reward
            beta * (log pi(y|x) - log ref(y|x)). Lower lets it move further.
        desirable_weight: the weight of a desirable example's loss (the paper's lambda_D).
        undesirable_weight: the weight of an undesirable example's loss (lambda_U). The paper recommends
            desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]; the run warns outside it.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise UserError(f"--kto.{name} must be above 0, got {getattr(self, name)}")


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/kto"),
    data: Unpaired | Preference | None = None,
    train: TrainArgs = TrainArgs(lr=5e-5, global_batch_size=16, micro_batch_size=4),
    kto: KTOArgs = KTOArgs(),
    lora: LoRAConfig = LoRAConfig(),
    full: bool = False,
    adapter: Path | None = None,
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
    """Tune a model on completions labelled good or bad (KTO): LoRA adapters by default, all weights with --full true.

    Args:
        checkpoint_dir: the Hugging Face model dir to tune (usually an instruct or SFT model).
        out_dir: where adapters (or model dirs), training state and logs go.
        data: the labelled completions (--data Unpaired --data.json_path FILE), or preference pairs
            (--data Preference --data.json_path FILE), each pair a desirable and an undesirable example.
        train: training loop settings; batch sizes count examples. A micro-batch needs at least 2: each example's
            KL sequence borrows the completion of another example of its micro-batch-sized group.
        kto: the KTO loss.
        lora: adapter settings (unused with --full true or --adapter).
        full: train every weight instead of LoRA adapters (use a lower --train.lr, e.g. 1e-6); outputs are
            Hugging Face model dirs.
        adapter: a LoRA adapter dir of this checkpoint (e.g. from `litllm finetune lora`) to start from: its
            layers keep training (with --full true it is merged into the weights first). The reference is then
            the checkpoint with this adapter. A resumed run needs the same --full and --adapter as the first.
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
    if train.micro_batch_size < 2:  # TRL refuses it too: the KL estimate would be the example's own log-ratio
        raise UserError(f"--train.micro_batch_size must be at least 2 for KTO, got {train.micro_batch_size}: each "
                        "example's KL sequence takes the completion of another example of its micro-batch")
    data = data or Unpaired()
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy)
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite,
                                  inputs=[checkpoint_dir, adapter, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length)
    if isinstance(data, Preference):
        train_data, val_data = UnpairedDataset.from_pairs(train_data), UnpairedDataset.from_pairs(val_data)
    for name, dataset in (("training", train_data), ("validation", val_data)):
        if len(dataset) == 1:
            raise UserError(f"KTO needs at least 2 {name} examples (each is also scored with another one's "
                            "completion), got 1; use more data, or --data.val_split_fraction 0 for no validation")
        dataset.add_kl_sequences(train.micro_batch_size, train.max_seq_length)
    check_balance(fabric, train_data, kto)

    model = load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    if adapter:
        lora = load_adapter(model, adapter, checkpoint_dir)
        if full:
            model = merge_lora(model)
    if full or adapter:
        # the starting model is the reference: score with it, once, each example the run will train or validate
        # on and its KL sequence, so no frozen copy of the model is needed
        progress = saved_progress(resume_from) if resume_from else Progress()
        fabric.print("Scoring the examples this run will use with the reference model (once, before training)")
        add_reference_logps(fabric, model, train_data, examples_to_come(len(train_data), train, seed, progress), train)
        add_reference_logps(fabric, model, val_data, examples_validated(len(val_data), train), train)
    if (full or adapter) and resume_from:  # training goes on from the checkpoint's weights
        model = load_model(resume_from if full else checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    if full:
        model.requires_grad_(True)
    elif resume_from:
        lora = load_adapter(model, resume_from, checkpoint_dir)
    elif not adapter:
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
        fit(fabric, model, optim, scheduler, progress, train_data, val_data, train, kto, seed, checkpoints)
    final = out_dir / "final"
    if full:
        fabric.print(f"Saved the tuned model to {final}\nTry it: litllm chat {final}")
    else:
        fabric.print(f"Saved the adapter to {final}\nTry it: litllm chat {checkpoint_dir} --adapter {final}")
    return final


def check_balance(fabric: L.Fabric, train_data: UnpairedDataset, args: KTOArgs) -> None:
    """Say how many desirable and undesirable examples there are, and warn (training goes on) when the weights do
    not balance them as the KTO paper recommends (its eq. 8, as TRL checks it):
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."""
    n_desirable = train_data.num_desirable
    n_undesirable = len(train_data) - n_desirable
    fabric.print(f"KTO: {n_desirable} desirable and {n_undesirable} undesirable training examples")
    if not n_desirable or not n_undesirable:
        return
    ratio = args.desirable_weight * n_desirable / (args.undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return
    target = 7 / 6  # the middle of the range, so that the rounded value printed lands inside it
    fabric.print(f"warning: desirable_weight x {n_desirable} desirable / (undesirable_weight x {n_undesirable} "
                 f"undesirable) is {ratio:.3g}, outside the [1, 4/3] the KTO paper recommends; set "
                 f"--kto.desirable_weight {args.desirable_weight * target / ratio:.3g} "
                 f"(or --kto.undesirable_weight {args.undesirable_weight * ratio / target:.3g})")


def kto_objective(fabric: L.Fabric | None, model: nn.Module, batch: dict[str, torch.Tensor], args: KTOArgs,
                  chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective: the KTO loss summed over a batch of examples (see UnpairedDataset.collate), and the metrics
    as TRL names them, as sums (see kto_metrics).

    The reference log-probs come with the batch when they were precomputed; otherwise the reference is the model
    with its LoRA adapters disabled, scored in the same step.
    """
    policy = sequence_logprobs(model, batch, chunk_size)
    with torch.no_grad():  # the KL estimate is a reference point for the rewards, not something to optimize
        policy_kl = sequence_logprobs(model, kl_sequences(batch), chunk_size)
    if "reference_logps" in batch:
        reference, reference_kl = batch["reference_logps"], batch["reference_kl_logps"]
    else:
        with torch.no_grad(), disable_adapters(model):
            reference = sequence_logprobs(model, batch, chunk_size)
            reference_kl = sequence_logprobs(model, kl_sequences(batch), chunk_size)
    kl = kl_estimate(fabric, policy_kl, reference_kl)
    desirable = batch["desirable"]
    losses, rewards = kto_loss(policy, reference, kl, desirable, args.beta, args.desirable_weight,
                               args.undesirable_weight)
    return losses.sum(), kto_metrics(rewards, policy, kl, desirable)


def kl_sequences(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's KL sequences (each example's prompt with its partner's completion), as sequence_logprobs reads
    a batch."""
    return {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"]}


def kl_estimate(fabric: L.Fabric | None, policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z from the log-probs (B,) of a micro-batch's KL sequences, estimated as TRL does: the
    mean over the micro-batch of log pi - log ref, averaged over devices (with no fabric: this micro-batch's own, as
    validation takes it), detached (the paper's z_ref: no gradient flows through it) and clamped at 0 (a KL
    divergence is never negative, though this estimate of one can be)."""
    kl = (policy_kl - reference_kl).mean().detach()
    return (kl if fabric is None else fabric.all_reduce(kl, reduce_op="mean")).clamp(min=0)


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses (B,) from the completions' log-probs under the policy and the reference (B,), the KL
    estimate z (a scalar) and which examples are desirable (B,), and the implicit rewards
    beta * (log pi - log ref) (B,), detached."""
    logratio = policy - reference
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, desirable_losses, undesirable_losses), beta * logratio.detach()


def kto_metrics(rewards: torch.Tensor, policy: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics of a batch, as sums: the rewards and log-probs over its desirable ("chosen") and its
    undesirable ("rejected") examples, with how many of each there are (kind_means turns them into means per kind),
    and the KL estimate once per example."""
    chosen, rejected = desirable, ~desirable
    return {
        "kl": kl * len(desirable),
        "rewards/chosen": rewards[chosen].sum(),
        "rewards/rejected": rewards[rejected].sum(),
        "logps/chosen": policy.detach()[chosen].sum(),
        "logps/rejected": policy.detach()[rejected].sum(),
        "count/chosen": chosen.sum(),
        "count/rejected": rejected.sum(),
    }


def kind_means(means: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Means per example of a step (or, with prefix "val_", of validation), with the rewards and log-probs turned
    into means over the examples of their kind, and rewards/margins, chosen minus rejected, as TRL logs them.

    The rewards and log-probs of a kind and its count are each a sum divided by all examples, so their ratio is the
    mean over that kind's examples. A kind absent from the step is left out of the log, as TRL leaves it.
    """
    means = dict(means)
    for kind in ("chosen", "rejected"):
        count = means.pop(f"{prefix}count/{kind}")
        for name in (f"{prefix}rewards/{kind}", f"{prefix}logps/{kind}"):
            total = means.pop(name)
            if count:
                means[name] = total / count
    if f"{prefix}rewards/chosen" in means and f"{prefix}rewards/rejected" in means:
        means[f"{prefix}rewards/margins"] = means[f"{prefix}rewards/chosen"] - means[f"{prefix}rewards/rejected"]
    return means


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    """The units KTO's loss is averaged over: examples, each one row of the batch (and one of its KL sequences)."""
    return batch["input_ids"].size(0)


@torch.no_grad()
def add_reference_logps(fabric: L.Fabric, model, dataset: UnpairedDataset, needed: list[int],
                        args: TrainArgs) -> None:
    """Score the examples at `needed` and their KL sequences with `model` as it is now, and store their log-probs in
    the dataset, as the KTO reference.

    Examples go through in fixed micro-batches (see fixed_micro_batches), so a resumed run computes bit for bit the
    reference the uninterrupted one did; each device scores its share of them (see split_over_devices).
    """
    model.eval()
    batches = fixed_micro_batches(needed, args.micro_batch_size, len(dataset))
    progress = tqdm(total=len(batches), desc="Reference log-probs", disable=not sys.stderr.isatty()
                    or fabric.global_rank > 0 or len(batches) < 10)

    def score(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = fabric.to_device(dataset.collate([dataset[i] for i in indices]))
        with fabric.autocast():
            logps = sequence_logprobs(model, batch, args.loss_chunk_size)
            kl_logps = sequence_logprobs(model, kl_sequences(batch), args.loss_chunk_size)
        progress.update(fabric.world_size)
        return logps.cpu(), kl_logps.cpu()

    for indices, (logps, kl_logps) in zip(batches, split_over_devices(fabric, batches, score)):
        dataset.set_reference_logps(indices, logps, kl_logps)
    progress.close()


def fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: UnpairedDataset, val_data: UnpairedDataset, args: TrainArgs, kto: KTOArgs, seed: int,
        checkpoints: Checkpoints) -> None:
    """The training loop: per optimizer step, forward and backward over this device's micro-batches of examples,
    then one optimizer step; log, validate and save at their intervals, and save `final` at the end."""
    total_steps = args.total_steps(len(train_data))
    log = StepLog(fabric, args, total_steps, progress.step)

    def objective(model, batch):  # validation: each micro-batch's own KL estimate, as on one device
        return kto_objective(None, model, batch, kto, args.loss_chunk_size)

    batches = step_batches(train_data, args, seed, progress, fabric)
    while progress.step < total_steps:
        micro_batches = next(batches)
        started = time.perf_counter()
        units = StepUnits(fabric, sum(count_examples(batch) for batch in micro_batches))
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            # gradients sync across devices on the last micro-batch only (DDP decides in forward, FSDP in backward)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                with fabric.autocast():
                    loss, metrics = kto_objective(fabric, model, batch, kto, args.loss_chunk_size)
                fabric.backward(loss * units.loss_scale)
            add_to(sums, {"loss": loss, **metrics})
        if args.grad_clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1

        metrics = {**kind_means(units.mean(sums)), "lr": scheduler.get_last_lr()[0]}
        seconds = time.perf_counter() - started
        if len(val_data) and args.is_eval_step(progress.step, total_steps):
            metrics |= kind_means(validate(fabric, model, val_data, args, objective, count_examples), prefix="val_")
            fabric.print(f"step {progress.step}: val loss {metrics['val_loss']:.4f}, val kl {metrics['val_kl']:.4f}")
        tokens = sum(b["input_ids"].numel() + b["kl_input_ids"].numel() for b in micro_batches)
        log.step(progress.step, metrics, tokens=tokens, seconds=seconds)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)

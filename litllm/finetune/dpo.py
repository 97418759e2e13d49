"""Direct Preference Optimization (DPO, arXiv 2305.18290) and its relatives: a Lightning Fabric script.

    litllm finetune dpo checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Preference --data.json_path pairs.jsonl
    python dpo.py --config dpo.yaml      # after `litllm cp finetune/dpo dpo.py`

DPO raises the policy's log-probability of each chosen response over the rejected one, measured against a frozen
reference model: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), log-probs summed over the response.
The reference is the model as training starts. With fresh LoRA adapters (the default) that is the base model, so it
is the same model with its adapters disabled: no second copy in memory. Otherwise (--full true, or --adapter to go on
from an SFT adapter) the reference log-probs of each pair the run will use are computed once, before training.

--dpo.loss simpo (SimPO, arXiv 2405.14734) and orpo (ORPO, arXiv 2403.07691) need no reference at all: they compare
the policy's log-probs of the two responses, each averaged over its tokens, so there is no reference pass of any kind.

setup() builds Fabric, the model, the data and the optimizer; fit() is the training loop and dpo_objective() with
dpo_loss() the objective, all here to edit. The mechanics they call (loss normalization across micro-batches and
devices, checkpoints, resume, validation) live in litllm.training.
Outputs: PEFT adapter dirs (or, with --full true, Hugging Face model dirs) under out_dir (step-NNNNNN/ and final/),
logs under out_dir/logs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import lightning_fabric as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.config import Config
from litllm.data import Preference, PreferenceDataset
from litllm.errors import UserError
from litllm.lora import LoRAConfig, apply_lora, count_parameters, disable_adapters, load_adapter, merge_lora, \
    save_adapter
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import check_strategy, check_tensor_parallel, model_dtype, setup_fabric
from litllm.training.loop import (StepLog, StepUnits, add_to, examples_to_come, examples_validated,
                                  fixed_micro_batches, prepare_data, setup_training, split_over_devices, step_batches,
                                  validate)
from litllm.training.losses import count_row_targets, sequence_logprobs
from litllm.training.state import Checkpoints, Progress, prepare_out_dir, saved_progress

PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"]
LOSSES = get_args(PreferenceLoss)


@dataclass
class DPOArgs:
    """The preference loss (the `--dpo.*` options).

    Attributes:
        beta: how far the policy may move from the reference: the temperature of the implicit reward
            beta * (log pi(y|x) - log ref(y|x)). Lower lets it move further.
        loss: "sigmoid": DPO's -log sigmoid(beta * h). "ipo": IPO's (h - 1 / (2 beta))^2 (arXiv 2310.12036).
            "hinge": SLiC's max(0, 1 - beta * h) (arXiv 2305.10425). h is the chosen minus the rejected
            log-ratio of policy to reference, each summed over the response tokens.
            Reference-free, from the policy's average log-prob per response token a_c, a_r:
            "simpo": -log sigmoid(beta * (a_c - a_r) - gamma); SimPO's authors use beta 2 to 10 and gamma 0.25 to
            0.5 times beta (TRL's default beta is 0.1, as here). "orpo": -a_c - beta * log sigmoid(log odds(a_c) - log odds(a_r)),
            with log odds(a) = a - log(1 - e^a): the chosen response's NLL plus beta (the paper's lambda; TRL
            calls it beta too) times the odds-ratio term.
        label_smoothing: the assumed probability that a pair's labels are flipped (conservative DPO; sigmoid and
            simpo losses): loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).
        gamma: SimPO's target reward margin (TRL's simpo_gamma).
    """

    beta: float = 0.1
    loss: PreferenceLoss = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"--dpo.loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.beta <= 0:
            raise UserError(f"--dpo.beta must be above 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise UserError(f"--dpo.label_smoothing applies to --dpo.loss sigmoid and simpo only, not {self.loss}")

    @property
    def reference_free(self) -> bool:
        return self.loss in ("simpo", "orpo")




def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/dpo"),
    data: Preference | None = None,
    train: TrainArgs = TrainArgs(lr=5e-5, global_batch_size=16, micro_batch_size=2),
    dpo: DPOArgs = DPOArgs(),
    lora: LoRAConfig = LoRAConfig(),
    full: bool = False,
    adapter: Path | None = None,
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
    """Tune a model on preference pairs with DPO: LoRA adapters by default, every weight with --full true.

    Args:
        checkpoint_dir: the Hugging Face model dir to tune (usually an instruct or SFT model).
        out_dir: where adapters (or model dirs), training state and logs go.
        data: the preference pairs (--data Preference --data.json_path FILE).
        train: training loop settings; batch sizes count pairs (a micro-batch of N pairs is 2N sequences).
        dpo: the preference loss.
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
        tensor_parallel: with --full true, split each transformer block's weights over groups of this many devices
            (Megatron-style tensor parallelism; it must divide the devices and the model's heads and MLP width); the
            groups shard with FSDP. 1: no splitting. LoRA adapters are not split (refused). See tutorials/pretrain.md.
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed of the run: data order, new weights and adapters, dropout.
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
        overwrite: start over in an out_dir that holds a run, deleting its checkpoints and logs (nothing else).
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_strategy(strategy, optimizer)
    if tensor_parallel > 1 and not full:
        raise UserError("--tensor_parallel does not split LoRA adapters yet; use it with --full true, or train LoRA "
                        "with --strategy fsdp")
    check_tensor_parallel(Config.from_hf(checkpoint_dir), tensor_parallel, devices * num_nodes, strategy)
    data = data or Preference()
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy, tensor_parallel)
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite,
                                  inputs=[checkpoint_dir, adapter, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length)

    model = load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    if adapter:
        lora = load_adapter(model, adapter, checkpoint_dir)
        if full:
            model = merge_lora(model)
    if (full or adapter) and not dpo.reference_free:
        # the starting model is the reference: score with it, once, each pair the run will train or validate on,
        # so no frozen copy of the model is needed
        progress = saved_progress(resume_from) if resume_from else Progress()
        fabric.print("Scoring the pairs this run will use with the reference model (once, before training)")
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
        fit(fabric, model, optim, scheduler, progress, train_data, val_data, train, dpo, seed, checkpoints)
    final = out_dir / "final"
    if full:
        fabric.print(f"Saved the tuned model to {final}\nTry it: litllm chat {final}")
    else:
        fabric.print(f"Saved the adapter to {final}\nTry it: litllm chat {checkpoint_dir} --adapter {final}")
    return final


def dpo_objective(model: nn.Module, batch: dict[str, torch.Tensor], args: DPOArgs, chunk_size: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective: the preference loss summed over a batch of pairs (see PreferenceDataset.collate: the chosen
    sequences, then the rejected ones), and the metrics as TRL names them, summed too.

    The reference log-probs come with the batch when they were precomputed; otherwise the reference is the model
    with its LoRA adapters disabled, scored in the same step. SimPO and ORPO have none.
    """
    policy = sequence_logprobs(model, batch, chunk_size)
    if args.reference_free:
        return reference_free_objective(policy / count_row_targets(batch).clamp(min=1), args)
    policy_chosen, policy_rejected = policy.chunk(2)
    if "reference_chosen_logps" in batch:
        reference_chosen, reference_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    else:
        with torch.no_grad(), disable_adapters(model):
            reference_chosen, reference_rejected = sequence_logprobs(model, batch, chunk_size).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, args.beta, args.loss,
        args.label_smoothing)
    return losses.sum(), reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


def reference_free_objective(average_logps: torch.Tensor, args: DPOArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO's or ORPO's loss summed over the pairs, from each sequence's average log-prob per response token
    (chosen rows, then rejected), and the metrics as TRL names them. The rewards are beta times the averages."""
    chosen, rejected = average_logps.chunk(2)
    extra = {}
    if args.loss == "simpo":
        losses = simpo_loss(chosen, rejected, args.beta, args.gamma, args.label_smoothing)
    else:
        losses, log_odds = orpo_loss(chosen, rejected, args.beta)
        extra = {"nll_loss": -chosen.detach().sum(), "log_odds_ratio": F.logsigmoid(log_odds).detach().sum(),
                 "log_odds_chosen": log_odds.detach().sum()}
    metrics = reward_metrics(args.beta * chosen.detach(), args.beta * rejected.detach(), chosen, rejected)
    return losses.sum(), {**metrics, **extra}


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward and log-prob metrics of a batch of pairs, each summed over the pairs."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """The units DPO's loss is averaged over: pairs, each two rows of the batch."""
    return batch["input_ids"].size(0) // 2


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) from sequence log-probs (B,), and the implicit rewards beta * (log pi - log ref) of the
    chosen and rejected responses (B,), detached."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
               ) -> torch.Tensor:
    """Per-pair SimPO losses (B,) from average log-probs per response token (B,)."""
    z = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses (B,) from average log-probs per response token (B,), and the log odds ratios (B,).

    The odds of a response are p / (1 - p) with p = exp(average log-prob), so log odds = a - log(1 - e^a); expm1
    keeps 1 - e^a exact for a near 0.
    """
    log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
    return -chosen - lam * F.logsigmoid(log_odds), log_odds


@torch.no_grad()
def add_reference_logps(fabric: L.Fabric, model, dataset: PreferenceDataset, needed: list[int],
                        args: TrainArgs) -> None:
    """Score the pairs at `needed` with `model` as it is now and store their log-probs in the dataset, as the DPO
    reference.

    Pairs go through in fixed micro-batches (see fixed_micro_batches), so a resumed run computes bit for bit the
    reference the uninterrupted one did; each device scores its share of them (see split_over_devices).
    """
    model.eval()
    batches = fixed_micro_batches(needed, args.micro_batch_size, len(dataset))
    progress = tqdm(total=len(batches), desc="Reference log-probs", disable=not sys.stderr.isatty()
                    or fabric.global_rank > 0 or len(batches) < 10)

    def score(indices: list[int]) -> torch.Tensor:
        batch = fabric.to_device(dataset.collate([dataset[i] for i in indices]))
        with fabric.autocast():
            logps = sequence_logprobs(model, batch, args.loss_chunk_size).cpu()
        progress.update(fabric.world_size)
        return logps

    for indices, logps in zip(batches, split_over_devices(fabric, batches, score)):
        dataset.set_reference_logps(indices, *logps.chunk(2))
    progress.close()


def fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: PreferenceDataset, val_data: PreferenceDataset, args: TrainArgs, dpo: DPOArgs, seed: int,
        checkpoints: Checkpoints) -> None:
    """The training loop: per optimizer step, forward and backward over this device's micro-batches of pairs, then
    one optimizer step; log, validate and save at their intervals, and save `final` at the end."""
    total_steps = args.total_steps(len(train_data))
    log = StepLog(fabric, args, total_steps, progress.step)

    def objective(model, batch):
        return dpo_objective(model, batch, dpo, args.loss_chunk_size)

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
                    loss, metrics = dpo_objective(model, batch, dpo, args.loss_chunk_size)
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
                         f"val reward accuracy {metrics['val_rewards/accuracies']:.3f}")
        log.step(progress.step, metrics, tokens=sum(b["input_ids"].numel() for b in micro_batches), seconds=seconds)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)

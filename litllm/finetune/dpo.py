"""Direct Preference Optimization (DPO, arXiv 2305.18290): a Lightning Fabric script.

    litllm finetune dpo checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Preference --data.json_path pairs.jsonl
    python dpo.py --config dpo.yaml      # after `litllm cp finetune/dpo dpo.py`

DPO raises the policy's log-probability of each chosen response over the rejected one, measured against a frozen
reference model: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), log-probs summed over the response.
The reference is the model as training starts. With fresh LoRA adapters (the default) that is the base model, so it
is the same model with its adapters disabled: no second copy in memory. Otherwise (--full true, or --adapter to go on
from an SFT adapter) each pair's reference log-probs are computed once, in one pass before training.

setup() builds Fabric, the model, the data and the optimizer; training.fit() is the loop, with DPOLoss as objective.
Outputs: PEFT adapter dirs (or, with --full true, Hugging Face model dirs) under out_dir (step-NNNNNN/ and final/),
logs under out_dir/logs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.data import IGNORE_INDEX, Preference, PreferenceDataset
from litllm.errors import UserError
from litllm.lora import LoRAConfig, apply_lora, count_parameters, disable_adapters, load_adapter, merge_lora, \
    save_adapter
from litllm.model import GPT
from litllm.tokenizer import Tokenizer
from litllm.training import (TrainArgs, check_strategy, fit, model_dtype, prepare_data, prepare_out_dir,
                             setup_fabric, setup_training)


@dataclass
class DPOArgs:
    """The preference loss (the `--dpo.*` options).

    Attributes:
        beta: how far the policy may move from the reference: the temperature of the implicit reward
            beta * (log pi(y|x) - log ref(y|x)). Lower lets it move further.
        loss: "sigmoid": DPO's -log sigmoid(beta * h). "ipo": IPO's (h - 1 / (2 beta))^2 (arXiv 2310.12036).
            "hinge": SLiC's max(0, 1 - beta * h) (arXiv 2305.10425). h is the chosen minus the rejected
            log-ratio of policy to reference, each summed over the response tokens.
        label_smoothing: the assumed probability that a pair's labels are flipped (conservative DPO, sigmoid loss
            only): loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0


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
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    precision: str | None = None,
    optimizer: Literal["AdamW", "AdamW8bit"] = "AdamW",
    logger: Literal["csv", "tensorboard", "wandb"] = "csv",
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
            the checkpoint with this adapter.
        devices: devices per node.
        num_nodes: nodes (machines); launch with torchrun, SLURM or `fabric run`.
        strategy: auto (one device); ddp (a replica of the model per device, each taking its share of every
            global batch); fsdp (as ddp, but each device holds only its shard of the weights, gradients and
            optimizer state; each transformer block is gathered just for its forward and backward).
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        optimizer: AdamW, or AdamW8bit from bitsandbytes.
        logger: where metrics go besides the terminal: csv, tensorboard or wandb.
        seed: random seed (data order, adapter init, dropout).
        resume: "auto" continues from the newest complete checkpoint in out_dir if there is one; true requires one.
            Pass the same --full and --adapter as the first run.
        overwrite: delete an existing out_dir and start over.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    objective = DPOLoss(dpo, train.loss_chunk_size)
    check_strategy(strategy, optimizer)
    resume_from = prepare_out_dir(out_dir, resume, overwrite)
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy)
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data or Preference(), tokenizer, train.max_seq_length)

    model = load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
    if adapter:
        lora = load_adapter(model, adapter, checkpoint_dir)
        if full:
            model = merge_lora(model)
    if full or adapter:
        # the starting model is the reference: score every pair with it once, then no frozen copy is needed
        add_reference_logps(fabric, model, [train_data, val_data], train)
        if resume_from:  # training goes on from the checkpoint's weights; the reference stays the starting model
            model = load_model(resume_from if full else checkpoint_dir, dtype=model_dtype(fabric),
                               device=fabric.device)
    if full:
        model.requires_grad_(True)
    elif resume_from:
        lora = load_adapter(model, resume_from, checkpoint_dir)
    elif not adapter:
        apply_lora(model, lora)
    fabric.print(f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, trainable=False):,}")
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train, len(train_data), resume_from)

    def save_weights(directory: Path, trained: GPT) -> None:
        if full:
            write_model_files(trained, directory)
        else:
            save_adapter(trained, lora, directory, base_checkpoint=checkpoint_dir)
        copy_tokenizer_files(checkpoint_dir, directory)

    fit(fabric, model, optim, scheduler, train_data, val_data, train, seed, out_dir, save_weights, progress,
        objective=objective)
    final = out_dir / "final"
    if full:
        fabric.print(f"Saved the tuned model to {final}\nTry it: litllm chat {final}")
    else:
        fabric.print(f"Saved the adapter to {final}\nTry it: litllm chat {checkpoint_dir} --adapter {final}")
    return final


class DPOLoss:
    """The objective `fit` minimizes: DPO's loss summed over a batch of pairs (see PreferenceDataset.collate), and
    the metrics as TRL names them, summed too (fit divides both by the pairs of the step).

    The reference log-probs come with the batch when they were precomputed; otherwise the reference is the model
    with its LoRA adapters disabled, scored in the same step.
    """

    def __init__(self, args: DPOArgs, chunk_size: int) -> None:
        if args.loss not in ("sigmoid", "ipo", "hinge"):
            raise UserError(f"--dpo.loss must be one of sigmoid, ipo, hinge; got {args.loss!r}")
        if args.beta <= 0:
            raise UserError(f"--dpo.beta must be above 0, got {args.beta}")
        if not 0 <= args.label_smoothing < 0.5:
            raise UserError(f"--dpo.label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
        if args.label_smoothing and args.loss != "sigmoid":
            raise UserError(f"--dpo.label_smoothing applies to --dpo.loss sigmoid only, not {args.loss}")
        self.args = args
        self.chunk_size = chunk_size

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_chosen, policy_rejected = sequence_logps(model, batch, self.chunk_size).chunk(2)
        if "reference_chosen_logps" in batch:
            reference_chosen, reference_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            with torch.no_grad(), disable_adapters(model):
                reference_chosen, reference_rejected = sequence_logps(model, batch, self.chunk_size).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.args.beta, self.args.loss,
            self.args.label_smoothing)
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum(),
        }
        return losses.sum(), metrics

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0) // 2  # pairs: the chosen half and the rejected half of the rows


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


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """log p(sequence): the log-probabilities of each row's target tokens (labels != -100) summed, (rows,) float32.

    Only target positions go through lm_head, `chunk_size` tokens at a time, and each chunk's logits are recomputed
    in backward rather than kept: the float32 logits of the vocabulary exist for one chunk at a time.
    """
    hidden = model(batch["input_ids"], return_hidden=True)  # (rows, T, hidden_size)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    row_of_token = keep.nonzero()[:, 0]  # (N,)
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # (N, hidden_size), (N,)
    token_logps = torch.cat([checkpoint(_token_logps, model.lm_head, h, t, use_reentrant=False)
                             for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))])
    totals = torch.zeros(keep.size(0), dtype=torch.float32, device=token_logps.device)
    return totals.index_add(0, row_of_token, token_logps)


def _token_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (chunk, vocab)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


@torch.no_grad()
def add_reference_logps(fabric: L.Fabric, model, datasets: list[PreferenceDataset], args: TrainArgs) -> None:
    """Score every pair with `model` as it is now and store the log-probs in the datasets, as the DPO reference."""
    model.eval()
    fabric.print(f"Scoring {sum(len(d) for d in datasets)} pairs with the reference model (once, before training)")
    for dataset in datasets:
        scores = []
        batch_starts = range(0, len(dataset), args.micro_batch_size)
        for start in tqdm(batch_starts, desc="Reference log-probs", disable=not sys.stderr.isatty()
                          or fabric.global_rank > 0 or len(batch_starts) < 10):
            batch = dataset.collate([dataset[i] for i in range(start, min(start + args.micro_batch_size,
                                                                            len(dataset)))])
            batch = {key: fabric.to_device(value) for key, value in batch.items()}
            with fabric.autocast():
                scores.append(torch.stack(sequence_logps(model, batch, args.loss_chunk_size).chunk(2)).cpu())
        if scores:
            chosen, rejected = torch.cat(scores, dim=1)  # (2, pairs)
            dataset.set_reference_logps(chosen, rejected)


if __name__ == "__main__":
    from litllm.cli import run

    run(setup)

"""Group Relative Policy Optimization (GRPO, arXiv 2402.03300): online RL with verifiable rewards or a reward model,
a Lightning Fabric script.

    litllm finetune grpo checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data Prompts \\
        --data.json_path data/arithmetic_demo.jsonl --reward accuracy --reward number_only
    python grpo.py --config grpo.yaml      # after `litllm cp finetune/grpo grpo.py`

Each step the model answers every prompt of the batch num_generations (G) times (rollouts), the rewards score the
answers, and each answer's advantage is its reward against the other answers to the same prompt: (r - group mean),
divided by the group's standard deviation. The policy then raises the log-probability of every token of an answer in
proportion to its advantage, PPO-style: through the ratio pi / pi_old of the policy to the one that sampled, clipped
to [1 - epsilon, 1 + epsilon_high], plus beta times a KL penalty to a reference model (Schulman's k3 estimator).
A group whose answers all score the same teaches nothing (advantage 0): `frac_reward_zero_std` in the log says how
many did, the first thing to look at when nothing learns.

Options are TRL's GRPOConfig names and defaults where it has them (`--grpo.*`); --train.global_batch_size and
--train.micro_batch_size count completions, as TRL's batch sizes do: a step takes global_batch_size / G prompts.

The reference (beta > 0): with fresh LoRA adapters, the model with its adapters disabled; starting from --adapter, a
copy of that adapter's small A/B tensors swapped in; with --full, a frozen copy of the whole model (twice the weights'
memory). With beta 0 (the default) there is no reference pass at all.

Rollouts: each prompt is prefilled once and its G answers decode together in the KV cache (under FSDP with the full
weights gathered once per batch of rollouts, so devices sample apart). Sampling draws from a generator seeded by
(seed, rollout step, the prompt's place in the step's batch), so a resumed run (--resume auto, even after kill -9)
and a run on more devices sample what one uninterrupted process does.

setup() builds Fabric, the model, the data, the rewards and the optimizer; fit() is the loop, rollouts() the sampling,
group_advantages() and grpo_token_loss() with aggregate() the objective, all here to edit. The mechanics they call
(checkpoints, resume, logging; scoring with the rewards on every device, the rollout metrics, the completions log in
litllm.training.rollouts) live in litllm.training.
Outputs: PEFT adapter dirs (or, with --full true, Hugging Face model dirs) under out_dir (step-NNNNNN/ and final/),
logs under out_dir/logs, with a few sampled completions and their rewards in completions.jsonl beside the metrics.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import lightning_fabric as L
import torch
import torch.nn as nn

from litllm.checkpoint import check_checkpoint_dir, copy_tokenizer_files, load_model, write_model_files
from litllm.data import IGNORE_INDEX, PromptDataset, Prompts, collate
from litllm.decode import check_sampling, sample_continuations
from litllm.errors import UserError
from litllm.lora import LoRAConfig, adapter_weights, apply_lora, count_parameters, disable_adapters, load_adapter, \
    lora_state_dict, merge_lora, save_adapter
from litllm.quantize import QuantizeMode, quantize_model
from litllm.rewards import Reward, load_rewards
from litllm.tokenizer import Tokenizer
from litllm.training.args import LoggerName, OptimizerName, Strategy, TrainArgs
from litllm.training.fabric import check_strategy, full_weights, model_dtype, setup_fabric
from litllm.training.loop import (StepLog, StepUnits, add_to, examples_validated, mean_over_devices, prepare_data,
                                  setup_training, step_indices)
from litllm.training.losses import target_hidden, target_logprobs
from litllm.training.rollouts import (completions_log, global_std, rollout_metrics, sampling_seed,
                                      score_everywhere, write_completions)
from litllm.training.state import Checkpoints, Progress, prepare_out_dir

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
Advantage = Literal["group", "rloo"]


@dataclass
class GRPOArgs:
    """Rollouts and the GRPO loss (the `--grpo.*` options; TRL's GRPOConfig names and defaults).

    Attributes:
        num_generations: completions sampled per prompt (G), at least 2: the group each reward is compared within.
        max_completion_length: the most new tokens per completion; one that reaches it without a stop token is
            "clipped" (completions/clipped_ratio).
        temperature: sampling temperature of the rollouts.
        top_p: sample only among the most likely tokens covering this probability mass.
        top_k: sample only among the k most likely tokens (None: all).
        beta: the weight of the KL penalty to the reference model (k3 estimator); 0 skips the reference entirely.
        epsilon: the ratio pi / pi_old is clipped below at 1 - epsilon.
        epsilon_high: ... and above at 1 + epsilon_high (None: epsilon; DAPO uses 0.28).
        num_iterations: optimizer steps on each batch of rollouts (mu). Above 1, the sampling policy's log-probs are
            kept as pi_old; with 1, pi_old is the policy itself (ratio 1) and none are computed.
        loss_type: how per-token losses become one: "grpo" averages each completion's tokens, then the completions;
            "bnpo" averages the tokens of each micro-batch; "dr_grpo" sums tokens over completions x
            max_completion_length (Dr. GRPO, no length bias); "dapo" averages over every completion token of the step
            (the ones in the loss: with mask_truncated_completions, not the masked ones).
        scale_rewards: divide advantages by the standard deviation of the group's rewards ("group"), of the whole
            batch's ("batch", all devices), or not at all ("none", as Dr. GRPO recommends).
        advantage: the baseline a reward is compared with: the group's mean ("group", GRPO) or the mean of the
            other G - 1 rewards of its group ("rloo", RLOO's leave-one-out: G / (G - 1) times the group advantage, so
            under scale_rewards "group" only the step size differs; pair it with scale_rewards "none").
        mask_truncated_completions: leave clipped completions out of the loss (DAPO): an answer cut off is no
            evidence of being right or wrong.
        completions_to_log: completions written, with their rewards, to completions.jsonl in the log directory at
            each logged step (0: none).
    """

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    advantage: Advantage = "group"
    mask_truncated_completions: bool = False
    completions_to_log: int = 4

    def __post_init__(self) -> None:
        for name, choices in (("loss_type", LossType), ("scale_rewards", ScaleRewards), ("advantage", Advantage)):
            if getattr(self, name) not in get_args(choices):
                raise UserError(f"--grpo.{name} must be one of {', '.join(get_args(choices))}; got "
                                f"{getattr(self, name)!r}")
        if self.num_generations < 2:
            raise UserError(f"--grpo.num_generations must be at least 2 (rewards are compared within a prompt's "
                            f"group), got {self.num_generations}")
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"--grpo.{name} must be at least 1, got {getattr(self, name)}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("--grpo.beta, --grpo.epsilon and --grpo.epsilon_high must be 0 or above")
        if not self.temperature > 0:
            raise UserError(f"--grpo.temperature must be above 0 (a group of greedy answers is one answer G times), "
                            f"got {self.temperature}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.completions_to_log < 0:
            raise UserError(f"--grpo.completions_to_log must be 0 or above, got {self.completions_to_log}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/grpo"),
    data: Prompts | None = None,
    reward: str | list[str] | None = None,
    reward_weights: list[float] | None = None,
    train: TrainArgs = TrainArgs(lr=1e-5, global_batch_size=16, micro_batch_size=4, max_seq_length=1024),
    grpo: GRPOArgs = GRPOArgs(),
    lora: LoRAConfig = LoRAConfig(dropout=0.0),
    full: bool = False,
    adapter: Path | None = None,
    quantize: QuantizeMode | None = None,
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
    """Train a model on its own sampled answers, scored by reward functions or a reward model (GRPO).

    Args:
        checkpoint_dir: the Hugging Face model dir to train (usually an instruct or SFT model).
        out_dir: where adapters (or model dirs), training state and logs go.
        data: the prompts (--data Prompts --data.json_path FILE); a row's other columns go to the reward functions.
        reward: what scores a completion, repeatable (--reward accuracy --reward my_rewards.py:short): a built-in
            (accuracy, number_only, answer_line), FILE.py:function or module:function of yours, or a reward model
            dir from `litllm finetune reward`. See litllm/rewards.py.
        reward_weights: one weight per --reward (default: 1 each); a completion's reward is the weighted sum.
        train: training loop settings; batch sizes count completions (a step takes global_batch_size /
            num_generations prompts); max_seq_length bounds prompt + completion.
        grpo: rollouts and the GRPO loss.
        lora: adapter settings (unused with --full true or --adapter). Dropout defaults to 0 here: the policy that
            samples (without dropout) is then the one trained, so the ratio pi / pi_old starts at 1 and the KL at 0.
        full: train every weight instead of LoRA adapters (use a lower --train.lr, e.g. 1e-6); outputs are
            Hugging Face model dirs.
        adapter: a LoRA adapter dir of this checkpoint (e.g. from `litllm finetune lora`) to start from: its
            layers keep training (with --full true it is merged into the weights first); it is the reference too.
            A resumed run needs the same --full and --adapter as the first.
        quantize: store the frozen base weights in 4 or 8 bits with bitsandbytes (QLoRA).
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
    check_strategy(strategy, optimizer, quantize)
    specs = [reward] if isinstance(reward, str) else list(reward or [])
    if not specs:
        raise UserError("name at least one reward: --reward accuracy, --reward FILE.py:function, or --reward DIR "
                        "(a reward model); see `litllm finetune grpo --help`")
    weights = check_reward_weights(reward_weights, len(specs))
    check_batches(train, grpo, devices * num_nodes)
    if train.max_seq_length <= grpo.max_completion_length:
        raise UserError(f"--train.max_seq_length ({train.max_seq_length}) must exceed --grpo.max_completion_length "
                        f"({grpo.max_completion_length}): it bounds prompt + completion")
    data = data or Prompts()
    fabric = setup_fabric(out_dir, precision, logger, devices, num_nodes, strategy)
    reward_dirs = [spec for spec in specs if Path(spec).is_dir()]
    resume_from = prepare_out_dir(fabric, out_dir, resume, overwrite,
                                  inputs=[checkpoint_dir, adapter, *reward_dirs, *data.sources()])
    fabric.seed_everything(seed)

    tokenizer = Tokenizer(checkpoint_dir)
    train_data, val_data = prepare_data(fabric, data, tokenizer, train.max_seq_length - grpo.max_completion_length)
    rewards = load_rewards(specs, dtype=model_dtype(fabric), device=fabric.device)

    def base_model() -> nn.Module:
        model = load_model(checkpoint_dir, dtype=model_dtype(fabric), device=fabric.device)
        return quantize_model(model, quantize) if quantize else model

    model = base_model()
    start_adapter, frozen = None, None
    if adapter:
        lora = load_adapter(model, adapter, checkpoint_dir)
        if full:
            model = merge_lora(model)
        elif grpo.beta:  # the starting adapter is the reference: a copy of its tensors, not of the model
            start_adapter = {name: t.detach().clone() for name, t in lora_state_dict(model).items()}
    if full and grpo.beta:  # the starting model is the reference: a frozen copy of it
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if resume_from:  # training goes on from the checkpoint's weights
        if full:
            model = load_model(resume_from, dtype=model_dtype(fabric), device=fabric.device)
        else:
            model = base_model() if adapter else model
            lora = load_adapter(model, resume_from, checkpoint_dir)
    elif not adapter and not full:
        apply_lora(model, lora)
    if full:
        model.requires_grad_(True)
    reference: Callable[[], AbstractContextManager[nn.Module]] | None = None
    if grpo.beta:
        reference = (partial(nullcontext, frozen) if full else
                     partial(adapter_weights, model, start_adapter) if start_adapter is not None else
                     partial(disable_adapters, model))  # fresh adapters: the base model, adapters off
    fabric.print(f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, trainable=False):,}")
    total_steps = grpo_total_steps(train, grpo, len(train_data))
    model, optim, scheduler, progress = setup_training(fabric, model, optimizer, train, total_steps, resume_from)

    def save_weights(directory: Path, trained: nn.Module) -> None:
        if full:
            write_model_files(trained, directory)
        else:
            save_adapter(trained, lora, directory, base_checkpoint=checkpoint_dir, quantize=quantize)
        copy_tokenizer_files(checkpoint_dir, directory)

    fabric.print(f"Rewards: {', '.join(f'{r.name} (x{w:g})' for r, w in zip(rewards, weights))}")
    run = Run(fabric, tokenizer, rewards, weights, reference, train, grpo, seed, completions_log(fabric, out_dir))
    with Checkpoints(fabric, out_dir, save_weights, train) as checkpoints:
        fit(run, model, optim, scheduler, progress, train_data, val_data, total_steps, checkpoints)
    final = out_dir / "final"
    if full:
        fabric.print(f"Saved the tuned model to {final}\nTry it: litllm chat {final}")
    else:
        fabric.print(f"Saved the adapter to {final}\nTry it: litllm chat {checkpoint_dir} --adapter {final}")
    return final


def check_reward_weights(weights: list[float] | None, n_rewards: int) -> list[float]:
    if weights is None:
        return [1.0] * n_rewards
    if len(weights) != n_rewards:
        raise UserError(f"--reward_weights has {len(weights)} weights for {n_rewards} --reward(s); give one each")
    return [float(w) for w in weights]


def check_batches(train: TrainArgs, grpo: GRPOArgs, world_size: int) -> None:
    """Batch sizes count completions: a step's must be whole groups, split evenly over the devices (a group never
    split), and cut into micro-batches evenly. With num_iterations mu > 1, steps come in runs of mu on one batch of
    rollouts, and checkpoints (which hold no rollouts) fall between runs."""
    G = grpo.num_generations
    if train.global_batch_size % (G * world_size):
        raise UserError(f"--train.global_batch_size {train.global_batch_size} must be a multiple of "
                        f"--grpo.num_generations {G} x {world_size} device(s): whole groups on every device")
    if train.global_batch_size // world_size % train.micro_batch_size:
        raise UserError(f"--train.global_batch_size {train.global_batch_size} / {world_size} device(s) must be a "
                        f"multiple of --train.micro_batch_size {train.micro_batch_size}")
    mu = grpo.num_iterations
    for name in ("max_steps", "save_interval"):
        if getattr(train, name) is not None and getattr(train, name) % mu:
            raise UserError(f"--train.{name} ({getattr(train, name)}) must be a multiple of --grpo.num_iterations "
                            f"({mu}): each batch of rollouts trains {mu} steps, and checkpoints fall between batches")


def grpo_total_steps(train: TrainArgs, grpo: GRPOArgs, n_prompts: int) -> int:
    """Optimizer steps: --train.max_steps, else num_iterations per batch of rollouts over `epochs` of the prompts."""
    prompts_per_step = train.global_batch_size // grpo.num_generations
    return train.max_steps or grpo.num_iterations * max(1, math.ceil(train.epochs * n_prompts / prompts_per_step))


@dataclass
class Run:
    """What every step of a run uses: the rewards and their weights, the reference (called, a context manager yielding
    the reference model, unwrapped; None when beta is 0), the settings, and where sampled completions are logged."""

    fabric: L.Fabric
    tokenizer: Tokenizer
    rewards: list[Reward]
    reward_weights: list[float]
    reference: Callable[[], AbstractContextManager[nn.Module]] | None
    train: TrainArgs
    grpo: GRPOArgs
    seed: int
    completions_log: Path  # where write_completions appends


# ------------------------------------------------------------------------------------------------ rollouts


@torch.no_grad()
def rollouts(run: Run, model: nn.Module, dataset: PromptDataset, indices: list[int], rollout: int, first_slot: int
             ) -> list[dict[str, Any]]:
    """G sampled completions of each prompt at `indices` (prompt-major: a prompt's group is consecutive), each
    {"prompt_index", "prompt_ids", "completion_ids", "truncated"}; these prompts are the step's batch from place
    `first_slot` on. `model` is the unwrapped module, in eval mode."""
    grpo, fabric = run.grpo, run.fabric
    samples = []
    for slot, index in enumerate(indices, start=first_slot):
        prompt_ids = dataset[index]["prompt_ids"]
        generator = torch.Generator(fabric.device).manual_seed(sampling_seed(run.seed, rollout, slot))
        with fabric.autocast():
            completions = sample_continuations(model, prompt_ids, grpo.num_generations, grpo.max_completion_length,
                                               grpo.temperature, grpo.top_k, grpo.top_p, run.tokenizer.stop_ids,
                                               generator)
        for ids in completions:
            samples.append({"prompt_index": index, "prompt_ids": prompt_ids, "completion_ids": ids,
                            "truncated": ids[-1] not in run.tokenizer.stop_ids})
    return samples


def group_advantages(rewards: torch.Tensor, num_generations: int, advantage: str = "group",
                     scale_rewards: str = "group", batch_std: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (n,) of rewards (n,) that come in consecutive groups of `num_generations`, and the standard
    deviation each was scaled by (n,): the group's (unbiased, as torch.std), or `batch_std` (scale_rewards "batch":
    the std of every reward of the step, all devices).

    advantage "group": r - the group's mean (GRPO); "rloo": r - the mean of the group's other rewards. Unless
    scale_rewards is "none", divided by std + 1e-4 (TRL's constant: an all-equal group gets 0, not NaN).
    """
    groups = rewards.view(-1, num_generations)
    if advantage == "rloo":
        baseline = (groups.sum(dim=1, keepdim=True) - groups) / (num_generations - 1)
    else:
        baseline = groups.mean(dim=1, keepdim=True)
    advantages = (groups - baseline).view(-1)
    if scale_rewards == "batch":
        std = torch.full_like(rewards, batch_std)
    else:
        std = groups.std(dim=1).repeat_interleave(num_generations)
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, std


# ------------------------------------------------------------------------------------------------ the loss


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                    advantages: torch.Tensor, args: GRPOArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses (N,) from the policy's log-probs of N completion tokens (N,), the sampling policy's (N,),
    the reference's (N,, or None with beta 0) and each token's completion's advantage (N,); and the metrics, summed
    over the tokens: the k3 KL, and how many tokens were clipped below and above (TRL counts a token as clipped
    where its clipped term is the one min() keeps: low with a negative advantage, high with a positive one).

    loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL, ratio = exp(logp - old),
    KL = exp(ref - logp) - (ref - logp) - 1.
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - args.epsilon) & (advantages < 0)
    high = (ratio > 1 + args.epsilon_high) & (advantages > 0)
    metrics = {"clip_ratio/low_mean": low.sum(), "clip_ratio/high_mean": high.sum(),
               "clip_ratio/region_mean": (low | high).sum()}
    if args.beta:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        losses = losses + args.beta * kl
        metrics["kl"] = kl.detach().sum()
    return losses, metrics


def aggregate(losses: torch.Tensor, rows: torch.Tensor, n_rows: int, loss_type: str, max_completion_length: int
              ) -> torch.Tensor:
    """A micro-batch's per-token losses (N,) of `n_rows` completions (each token's row in `rows`) summed over its
    units (see loss_units), as loss_type normalizes them."""
    if loss_type == "grpo":  # each completion's mean, summed over completions
        per_row = torch.zeros(n_rows, dtype=losses.dtype, device=losses.device).index_add(0, rows, losses)
        return (per_row / torch.bincount(rows, minlength=n_rows).clamp(min=1)).sum()
    if loss_type == "bnpo":  # the micro-batch's mean token loss
        return losses.sum() / max(len(losses), 1)
    if loss_type == "dr_grpo":  # over completions x max_completion_length
        return losses.sum() / max_completion_length
    return losses.sum()  # dapo: over every completion token of the step


def loss_units(batch: dict[str, torch.Tensor], loss_type: str) -> int:
    """The units a step's loss is averaged over, in one micro-batch: completions (grpo, dr_grpo), the micro-batch
    itself (bnpo) or completion tokens (dapo, the masked ones left out)."""
    if loss_type == "bnpo":
        return 1
    if loss_type == "dapo":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return batch["input_ids"].size(0)


def micro_batch(samples: list[dict[str, Any]], pad_id: int, mask_truncated: bool) -> dict[str, torch.Tensor]:
    """Completions as a training batch: prompt + completion right-padded, labels -100 but on completion tokens (all
    -100 for a truncated one when it is masked), each row's advantage, and the sampling policy's and the reference's
    log-probs of the labelled tokens, flat in their order (when computed)."""
    examples = []
    for s in samples:
        ids = s["prompt_ids"] + s["completion_ids"]
        labelled = not (mask_truncated and s["truncated"])
        labels = [IGNORE_INDEX] * len(s["prompt_ids"]) + (s["completion_ids"] if labelled else
                                                          [IGNORE_INDEX] * len(s["completion_ids"]))
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    batch = collate(examples, pad_id)
    batch["advantages"] = torch.tensor([s["advantage"] for s in samples], dtype=torch.float32)
    for key in ("old_logps", "ref_logps"):
        if key in samples[0]:
            kept = [s[key] for s in samples if not (mask_truncated and s["truncated"])]
            batch[key] = torch.cat(kept) if kept else torch.zeros(0)
    return batch


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int, temperature: float,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The model's log-probs of the batch's labelled tokens (N,) in float32, at the sampling temperature (as TRL
    computes them), their entropies (N,) if asked for (else None), and their rows (N,)."""
    hidden = model(batch["input_ids"], return_hidden=True)
    hidden, targets, rows = target_hidden(hidden, batch["labels"])
    logps, entropies = target_logprobs(model.lm_head, hidden, targets, chunk_size, temperature, entropy)
    return logps, entropies, rows


def grpo_objective(model: nn.Module, batch: dict[str, torch.Tensor], args: GRPOArgs, chunk_size: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss summed over its units, and its token metrics summed (entropy, clip counts, KL)."""
    logps, entropy, rows = completion_logps(model, batch, chunk_size, args.temperature, entropy=True)
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # mu = 1: the policy sampled itself
    losses, metrics = grpo_token_loss(logps, old, batch.get("ref_logps"), batch["advantages"][rows], args)
    loss = aggregate(losses, rows, batch["input_ids"].size(0), args.loss_type, args.max_completion_length)
    return loss, {**metrics, "entropy": entropy.sum(), "count/tokens": torch.tensor(float(len(logps)))}


@torch.no_grad()
def add_logps(run: Run, model: nn.Module, samples: list[dict[str, Any]], key: str) -> None:
    """Store `model`'s log-probs of each completion's tokens (a float32 tensor per sample) under `key`."""
    for start in range(0, len(samples), run.train.micro_batch_size):
        chunk = samples[start:start + run.train.micro_batch_size]
        batch = run.fabric.to_device(micro_batch(chunk, run.tokenizer.padding_id, mask_truncated=False))
        with run.fabric.autocast():
            logps, _, rows = completion_logps(model, batch, run.train.loss_chunk_size, run.grpo.temperature)
        for row, s in enumerate(chunk):
            s[key] = logps[rows == row].cpu()


# ------------------------------------------------------------------------------------------------ the loop


def rollout_batch(run: Run, model: nn.Module, dataset: PromptDataset, indices: list[int], rollout: int,
                  first_slot: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """This device's completions of the prompts at `indices` (the step's batch from place `first_slot` on), scored,
    with advantages (and pi_old's and the reference's log-probs where the loss needs them), and the rollout metrics
    over all devices."""
    fabric, grpo = run.fabric, run.grpo
    # no DDP hooks, and under FSDP the full weights gathered once: each device samples on its own, stopping when its
    # answers end, with no collective per token
    with full_weights(model.module) as raw:
        raw.eval()
        started = time.perf_counter()
        samples = rollouts(run, raw, dataset, indices, rollout, first_slot)
        generated = time.perf_counter()
        per_reward = score_everywhere(fabric, run.rewards, run.tokenizer, dataset, samples)
        rewards = (per_reward * torch.tensor(run.reward_weights)).nansum(dim=1)
        batch_std = global_std(fabric, rewards) if grpo.scale_rewards == "batch" else None
        advantages, std = group_advantages(rewards, grpo.num_generations, grpo.advantage, grpo.scale_rewards,
                                           batch_std)
        for s, reward, advantage, per in zip(samples, rewards.tolist(), advantages.tolist(), per_reward.tolist()):
            s["reward"], s["advantage"], s["rewards"] = reward, advantage, per
        if grpo.num_iterations > 1:
            add_logps(run, raw, samples, "old_logps")
        if run.reference is not None:
            with run.reference() as reference:
                add_logps(run, reference, samples, "ref_logps")
        raw.train()
    scored = time.perf_counter()
    metrics = rollout_metrics(fabric, run.rewards, samples, per_reward, rewards, std)
    tokens = sum(len(s["completion_ids"]) for s in samples)
    metrics |= {"timing/generate": generated - started, "timing/score": scored - generated,
                "rollout_tokens_per_sec": tokens * fabric.world_size / max(generated - started, 1e-9)}
    return samples, metrics


def fit(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
        train_data: PromptDataset, val_data: PromptDataset, total_steps: int, checkpoints: Checkpoints) -> None:
    """The loop: per batch of rollouts, sample and score this device's prompts' groups, then num_iterations optimizer
    steps over them (forward and backward per micro-batch); log, validate and save at their intervals, and save
    `final` at the end."""
    fabric, args, grpo = run.fabric, run.train, run.grpo
    log = StepLog(fabric, args, total_steps, progress.step)
    per_device = args.global_batch_size // grpo.num_generations // fabric.world_size
    prompt_batches = step_indices(len(train_data), replace(args, global_batch_size=per_device * fabric.world_size),
                                  run.seed, progress)
    while progress.step < total_steps:
        indices = next(prompt_batches)
        first = fabric.global_rank * per_device
        samples, rollout_log = rollout_batch(run, model, train_data, indices[first:first + per_device],
                                             progress.step // grpo.num_iterations, first)
        first_step = progress.step + 1
        for iteration in range(grpo.num_iterations):
            started = time.perf_counter()
            metrics, tokens = train_step(run, model, optimizer, samples)
            scheduler.step()
            progress.step += 1
            metrics |= {**rollout_log, "timing/train": time.perf_counter() - started, "lr": scheduler.get_last_lr()[0]}
            seconds = metrics["timing/train"]
            if iteration == 0:  # the rollouts' time counts once
                seconds += rollout_log["timing/generate"] + rollout_log["timing/score"]
            if len(val_data) and args.is_eval_step(progress.step, total_steps):
                metrics |= validate(run, model, val_data, progress.step)
                fabric.print(f"step {progress.step}: val reward {metrics['val_reward']:.4f}")
            log.step(progress.step, metrics, tokens=tokens, seconds=seconds)
        logged = any(step == 1 or step % args.log_interval == 0 for step in range(first_step, progress.step + 1))
        if logged and grpo.completions_to_log and fabric.global_rank == 0:  # a few of the first device's
            write_completions(run.completions_log, first_step, samples[:grpo.completions_to_log], train_data,
                              run.rewards)
        # every --train.save_interval steps, and at once when the run is told to stop (SIGTERM, Ctrl-C)
        checkpoints.after_step(model, optimizer, scheduler, progress, total_steps)
    log.close()
    checkpoints.save_final(model, optimizer, scheduler, progress)


def train_step(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, samples: list[dict[str, Any]]
               ) -> tuple[dict[str, float], int]:
    """One optimizer step over this device's completions, micro-batch by micro-batch; its metrics over all devices
    and the tokens this device trained on."""
    fabric, args, grpo = run.fabric, run.train, run.grpo
    batches = [micro_batch(samples[start:start + args.micro_batch_size], run.tokenizer.padding_id,
                           grpo.mask_truncated_completions)
               for start in range(0, len(samples), args.micro_batch_size)]
    units = StepUnits(fabric, sum(loss_units(batch, grpo.loss_type) for batch in batches))
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = fabric.to_device(batch)
        # gradients sync across devices on the last micro-batch only (DDP decides in forward)
        with fabric.no_backward_sync(model, enabled=i < len(batches) - 1):
            with fabric.autocast():
                loss, metrics = grpo_objective(model, batch, grpo, args.loss_chunk_size)
            fabric.backward(loss * units.loss_scale)
        add_to(sums, {"loss": loss, **metrics})
    if args.grad_clip is not None:
        fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = units.mean({"loss": sums.pop("loss")})
    token_sums = mean_over_devices(fabric, sums, 1.0)
    n_tokens = max(token_sums.pop("count/tokens"), 1.0)
    metrics = {**loss, **{name: total / n_tokens for name, total in token_sums.items()}}
    return metrics, sum(b["input_ids"].numel() for b in batches)


@torch.no_grad()
def validate(run: Run, model: nn.Module, val_data: PromptDataset, step: int) -> dict[str, float]:
    """Rollout metrics (val_reward, val_rewards/<name>/mean, ...) on the validation prompts (at most
    --train.eval_max_batches x micro_batch_size of them), each device sampling its share, with the same draws at
    every validation so that its changes are the model's."""
    fabric, grpo = run.fabric, run.grpo
    prompts = examples_validated(len(val_data), run.train)
    share = math.ceil(len(prompts) / fabric.world_size)
    mine = prompts[fabric.global_rank * share:(fabric.global_rank + 1) * share]
    with full_weights(model.module) as raw:
        raw.eval()
        samples = rollouts(run, raw, val_data, mine, rollout=-1, first_slot=fabric.global_rank * share)
        raw.train()
    per_reward = score_everywhere(fabric, run.rewards, run.tokenizer, val_data, samples)
    rewards = (per_reward * torch.tensor(run.reward_weights)).nansum(dim=1)
    std = group_advantages(rewards, grpo.num_generations)[1] if samples else rewards
    return rollout_metrics(fabric, run.rewards, samples, per_reward, rewards, std, prefix="val_")


if __name__ == "__main__":
    from litllm.cli import run as run_cli

    run_cli(setup)

"""The mechanics around online RL's rollouts (litllm.finetune.grpo): the seed each group of answers is sampled with,
scoring sampled completions with the reward functions on every device, TRL's rollout metrics over all devices, and
the log of sampled completions.

A sample is a dict with at least "prompt_index" (its row of the PromptDataset), "completion_ids" and "truncated".
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning_fabric as L
import torch

from litllm.data import PromptDataset
from litllm.errors import UserError
from litllm.rewards import Reward
from litllm.tokenizer import Tokenizer
from litllm.training.loop import mean_over_devices

RESERVED = ("prompt", "completion", "completion_ids")  # data columns never passed to reward functions (as TRL)


def sampling_seed(seed: int, rollout: int, slot: int) -> int:
    """The seed of one group's sampling: a function of (run seed, rollout step, the group's place in the step's
    batch of prompts) only, so any device, in any run that reaches this step, draws the same completions (and a prompt
    that comes twice in one batch gets two different groups)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rollout}:{slot}".encode()).digest()[:8], "little") >> 1


def score(rewards: list[Reward], tokenizer: Tokenizer, dataset: PromptDataset, samples: list[dict[str, Any]]
          ) -> torch.Tensor:
    """Each reward's score of each completion (n_completions, n_rewards) in float32, NaN where one returned None.
    Stores each completion's text under "completion"."""
    if not samples:  # a device with no validation prompts: no reward function is called with nothing
        return torch.zeros(0, len(rewards))
    rows = [dataset[s["prompt_index"]] for s in samples]
    prompts = [row["prompt"] for row in rows]
    texts = [tokenizer.decode(s["completion_ids"], skip_special_tokens=True) for s in samples]
    # as TRL: a chat prompt's completion is a message, a string prompt's a string
    completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                   for prompt, text in zip(prompts, texts)]
    # every column any row has (None where a row lacks it), but the names TRL keeps for itself
    keys = [key for key in dict.fromkeys(k for row in rows for k in row["columns"]) if key not in RESERVED]
    columns = {key: [row["columns"].get(key) for row in rows] for key in keys}
    ids = [s["completion_ids"] for s in samples]
    scores = [reward(prompts, completions, ids, columns) for reward in rewards]
    for sample, text in zip(samples, texts):
        sample["completion"] = text
    return torch.tensor(scores, dtype=torch.float32).T


def score_everywhere(fabric: L.Fabric, rewards: list[Reward], tokenizer: Tokenizer, dataset: PromptDataset,
                     samples: list[dict[str, Any]]) -> torch.Tensor:
    """`score`, where a reward that fails on any device stops every device (none is left waiting for the others)."""
    try:
        scores, failure = score(rewards, tokenizer, dataset, samples), None
    except UserError as error:
        scores, failure = None, error
    failed = torch.tensor(int(failure is not None), device=fabric.device)
    if fabric.world_size > 1 and int(fabric.all_reduce(failed, reduce_op="max")) and failure is None:
        raise UserError("a reward failed on another process (its message is above); stopping here too")
    if failure is not None:
        raise failure
    return scores


def global_std(fabric: L.Fabric, values: torch.Tensor) -> float:
    """The unbiased standard deviation of `values` on every device together."""
    totals = fabric.all_reduce(torch.tensor([len(values), values.sum(), (values ** 2).sum()], dtype=torch.float64,
                                            device=fabric.device), reduce_op="sum")
    n, total, squares = totals.tolist()
    return math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1))


def rollout_metrics(fabric: L.Fabric, rewards: list[Reward], samples: list[dict[str, Any]], per_reward: torch.Tensor,
                    total_rewards: torch.Tensor, std: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """TRL's rollout metrics over every device's completions, from each reward's scores (n, n_rewards), the weighted
    rewards (n,) and the std each was scaled by (n,): reward (mean), reward_std (the mean std rewards were scaled
    by), rewards/<name>/mean and /std (over the completions each scored), frac_reward_zero_std,
    completions/mean_length and completions/clipped_ratio."""
    sums: dict[str, torch.Tensor | float] = {
        "completions": len(samples), "reward": total_rewards.sum(), "reward_std": std.sum(),
        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).sum(),
        "completions/mean_length": sum(len(s["completion_ids"]) for s in samples),
        "completions/clipped_ratio": sum(s["truncated"] for s in samples),
    }
    for i, reward in enumerate(rewards):
        scored = per_reward[:, i][~per_reward[:, i].isnan()].double()
        sums |= {f"n/{reward.name}": len(scored), f"sum/{reward.name}": scored.sum(),
                 f"squares/{reward.name}": (scored ** 2).sum()}
    totals = mean_over_devices(fabric, sums, 1.0)  # sums over devices
    n = max(totals["completions"], 1.0)
    metrics = {name: totals[name] / n for name in ("reward", "reward_std", "frac_reward_zero_std",
                                                    "completions/mean_length", "completions/clipped_ratio")}
    for reward in rewards:
        count, total, squares = (totals[f"{kind}/{reward.name}"] for kind in ("n", "sum", "squares"))
        metrics[f"rewards/{reward.name}/mean"] = total / count if count else math.nan
        variance = (squares - total * total / count) / (count - 1) if count > 1 else math.nan
        metrics[f"rewards/{reward.name}/std"] = math.sqrt(max(variance, 0.0))
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def completions_log(fabric: L.Fabric, out_dir: Path) -> Path:
    """completions.jsonl in the directory this run's logger writes to (logs/version_N for csv and tensorboard)."""
    directory = getattr(fabric.logger, "log_dir", None) if fabric.loggers else None
    return (Path(directory) if directory else out_dir / "logs") / "completions.jsonl"


def write_completions(path: Path, step: int, samples: list[dict[str, Any]], dataset: PromptDataset,
                      rewards: list[Reward]) -> None:
    """Append `samples` (scored: with "completion", "reward", "advantage" and "rewards") to the JSON lines file at
    `path`, one per completion: its prompt, what the model wrote, and what each reward made of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        for s in samples:
            row = {"step": step, "prompt": dataset[s["prompt_index"]]["prompt"], "completion": s["completion"],
                   "reward": s["reward"], "advantage": s["advantage"],
                   "rewards": {r.name: None if math.isnan(v) else v for r, v in zip(rewards, s["rewards"])}}
            file.write(json.dumps(row, ensure_ascii=False) + "\n")

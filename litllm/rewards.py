"""Rewards for online RL (`litllm finetune grpo --reward SPEC`): built-in reward functions, the user's own, and
reward models, each behind one call that scores a batch of completions.

A SPEC is one of:
- a built-in name: `accuracy`, `number_only`, `answer_line` (the functions below; read them as examples);
- `path/to/file.py:function` or `package.module:function`: a function of yours;
- a directory: a reward model from `litllm finetune reward` (a model dir, or the LoRA adapter dir it saved).

A reward function is called as TRL calls one: `fn(prompts=[...], completions=[...], completion_ids=[...], **columns)`
with one entry per completion in each list: the prompt as the data row wrote it, the completion (a string, or, where
the prompt is a list of chat messages, `[{"role": "assistant", "content": text}]`), its token ids, and every other
column of the row (e.g. `answer=[...]`). It returns one float per completion, or None where it cannot score one
(left out of that function's mean; a completion no function scores gets reward 0).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from litllm.errors import UserError

BUILT_IN = ("accuracy", "number_only", "answer_line")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_LINE = re.compile(r"####\s*(\S+)")
_LITLLM_DIR = str(Path(__file__).resolve().parent)


# ---------------------------------------------------------------------------------------------- built-in rewards


def accuracy(completions: list, answer: list, **_: Any) -> list[float | None]:
    """1.0 where the completion's final answer equals the row's `answer`, else 0.0 (None where a row has no answer).

    A final answer is the number after "####" (GSM8K's answer line) when there is one, else the last number in the
    text; `answer` may be a number or a string read the same way (a GSM8K worked solution ending in "#### 72").
    Numbers compare as values: "1,000", "1000" and "1000.0" are equal.
    """
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer):
        target = final_number(str(expected)) if expected is not None else None
        if target is None:
            rewards.append(None)
            continue
        got = final_number(completion_text(completion))
        rewards.append(float(got is not None and math.isclose(got, target, rel_tol=1e-9, abs_tol=1e-9)))
    return rewards


def number_only(completions: list, **_: Any) -> list[float]:
    """1.0 where the completion is a number and nothing else (surrounding spaces and a final period allowed), the
    format a prompt such as "What is 21 - 10? Reply with the number only." asks for; else 0.0."""
    return [float(bool(_NUMBER.fullmatch(completion_text(c).strip().removesuffix(".").strip())))
            for c in completions]


def answer_line(completions: list, **_: Any) -> list[float]:
    """1.0 where the completion ends with GSM8K's answer line, "#### <number>", else 0.0."""
    rewards = []
    for completion in completions:
        lines = completion_text(completion).strip().splitlines()
        match = _ANSWER_LINE.fullmatch(lines[-1].strip()) if lines else None
        rewards.append(float(match is not None and _NUMBER.fullmatch(match.group(1)) is not None))
    return rewards


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """A completion's text: the string itself, or the content of its (assistant) message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def final_number(text: str) -> float | None:
    """The number after the last "####" in `text`, else its last number (None without one)."""
    lines = _ANSWER_LINE.findall(text)
    candidates = _NUMBER.findall(lines[-1]) if lines else _NUMBER.findall(text)
    if not candidates:
        return None
    return float(candidates[-1 if not lines else 0].replace(",", ""))


# ---------------------------------------------------------------------------------------------- loading and calling


class Reward:
    """One reward: a function or a reward model, named as its metrics are (`rewards/<name>/mean`)."""

    def __init__(self, spec: str, name: str, function: Callable | None = None, reward_model=None) -> None:
        self.spec, self.name, self.function, self.reward_model = spec, name, function, reward_model

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list]) -> list[float]:
        """One reward per completion, NaN where the function returned None."""
        if self.reward_model is not None:
            return self.reward_model.score([conversation(p, c) for p, c in zip(prompts, completions)])
        try:
            values = self.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:  # the user's code: say where in it, not where in litllm
            raise UserError(f"reward function {self.spec} raised {type(error).__name__}: {error}"
                            f"{user_frames(error)}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"reward function {self.spec} returned {got} for {len(completions)} completions; it must "
                            "return a list with one float (or None) per completion")
        rewards = []
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"reward function {self.spec} returned {value!r} ({type(value).__name__}); rewards "
                                "are floats (or None for a completion it cannot score)")
            rewards.append(math.nan if value is None else float(value))
        return rewards


def conversation(prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]]) -> str | list[dict]:
    """What a reward model scores: the prompt's messages with the completion as the assistant's answer, or, for a
    string prompt, the user's message and the answer (as the policy saw it under its chat template)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return [*messages, {"role": "assistant", "content": completion_text(completion)}]


def user_frames(error: BaseException) -> str:
    """Where in the user's files `error` was raised: " (at file:line in function)" for each frame of the traceback
    outside litllm, innermost last; "" when there is none."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not str(Path(frame.filename).resolve()).startswith(_LITLLM_DIR)]
    return "".join(f" (at {frame.filename}:{frame.lineno} in {frame.name})" for frame in frames[-3:])


def load_rewards(specs: list[str], dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> list[Reward]:
    """A Reward for each SPEC (see the module docstring); a SPEC that cannot be loaded is a UserError naming it. Reward
    models load with `dtype` on `device`."""
    rewards = []
    for spec in specs:
        reward = _load(spec, dtype, device)
        names = [r.name for r in rewards]
        if reward.name in names:  # two of a kind (e.g. two reward models named final): keep the metrics apart
            reward.name = f"{reward.name}_{names.count(reward.name) + 1}"
        rewards.append(reward)
    return rewards


def _load(spec: str, dtype, device) -> Reward:
    if spec in BUILT_IN:
        return Reward(spec, spec, function=globals()[spec])
    if Path(spec).is_dir():
        from litllm.reward import RewardModel

        return Reward(spec, Path(spec).resolve().name, reward_model=RewardModel.load(spec, dtype=dtype, device=device))
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise UserError(f"--reward {spec}: not a built-in reward ({', '.join(BUILT_IN)}), a reward model directory, "
                        "or FILE.py:function / module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UserError(f"--reward {spec}: {path} is not a file")
        module_spec = importlib.util.spec_from_file_location(f"litllm_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise UserError(f"--reward {spec}: importing {path} raised {type(error).__name__}: {error}"
                            f"{user_frames(error)}") from None
    else:
        if str(Path.cwd()) not in sys.path:  # modules in the working directory import, as under `python -m`
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise UserError(f"--reward {spec}: cannot import {module_name} ({type(error).__name__}: {error}); give a "
                            "file as path/to/file.py:function, or a module on the Python path") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        found = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                       and getattr(value, "__module__", None) == module.__name__)
        raise UserError(f"--reward {spec}: {module_name} has no function {function_name}"
                        + (f" (functions: {', '.join(found)})" if found else ""))
    return Reward(spec, function_name, function=function)


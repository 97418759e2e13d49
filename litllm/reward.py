"""The Python API of reward models: `RewardModel.load(...)` then `.score(items)`."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from litllm.checkpoint import check_checkpoint_dir, load_model, parse_device, parse_dtype
from litllm.errors import UserError
from litllm.lora import load_adapter, merge_lora, named_base
from litllm.model import RewardGPT
from litllm.tokenizer import Tokenizer

Item = str | list[dict[str, str]]


class RewardModel:
    """A reward model from `litllm finetune reward` (or any Llama/Mistral/Qwen *ForSequenceClassification with one
    label): `model` (a RewardGPT) and its `tokenizer`."""

    def __init__(self, model: RewardGPT, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, checkpoint_dir: Path | str, adapter: Path | str | None = None,
             dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> RewardModel:
        """Load a reward model dir (`litllm finetune reward --full true`), or the base checkpoint a LoRA reward
        adapter was trained on with `adapter` (its final/ or step-NNNNNN/ dir; the adapter carries the score head).
        A LoRA reward adapter dir alone loads onto the base checkpoint it names.
        dtype defaults to float32 on CPU and the checkpoint's dtype on GPU."""
        if adapter is None and (Path(checkpoint_dir) / "adapter_config.json").is_file():
            adapter, checkpoint_dir = Path(checkpoint_dir), named_base(Path(checkpoint_dir))
            if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
                raise UserError(f"{adapter}: its base checkpoint {checkpoint_dir!r} is not a local directory; load "
                                "it with RewardModel.load(base, adapter=...)")
        checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        if adapter is None and not is_reward_model_dir(checkpoint_dir):
            raise UserError(f"{checkpoint_dir}: a language model, not a reward model (no score head); train one with "
                            "`litllm finetune reward`, or pass the adapter it saved: RewardModel.load(base, "
                            "adapter=...)")
        device = parse_device(device)
        dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else None)
        model = load_model(checkpoint_dir, dtype=dtype, device=device, reward=True)
        tokenizer = Tokenizer(checkpoint_dir)
        if model.config.pad_token_id is None:  # as training chose it (see finetune/reward.py: set_pad_id)
            model.config = replace(model.config, pad_token_id=tokenizer.padding_id)
        if adapter is not None:
            load_adapter(model, adapter, base_checkpoint=checkpoint_dir)
            model = merge_lora(model)
        return cls(model, tokenizer)

    def encode(self, item: Item) -> list[int]:
        """Token ids of a plain string as it is (no template; the tokenizer's own BOS/EOS rules), or of a list of chat
        messages rendered with the chat template as training rendered the pairs."""
        if isinstance(item, str):
            return self.tokenizer.encode(item)
        if isinstance(item, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in item):
            return self.tokenizer.encode_chat(item, add_generation_prompt=False)
        raise UserError(f"a reward model scores strings or lists of chat messages ({{'role', 'content'}} dicts), "
                        f"not {type(item).__name__}: {str(item)[:60]!r}")

    @torch.inference_mode()
    def score(self, items: list[Item] | Item, batch_size: int = 8) -> list[float] | float:
        """The reward of each item (a float for a single item), computed `batch_size` items at a time, items of similar
        length together."""
        if isinstance(items, str) or (isinstance(items, list) and items and isinstance(items[0], dict)):
            return self.score([items], batch_size)[0]
        ids = [self.encode(item) for item in items]
        pad_id = self.model.config.pad_token_id
        device = self.model.embed_tokens.weight.device
        scores = [0.0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.tensor([ids[i] + [pad_id] * (width - len(ids[i])) for i in rows], device=device)
            for i, reward in zip(rows, self.model(batch).tolist()):
                scores[i] = reward
        return scores


def is_reward_model_dir(checkpoint_dir: Path) -> bool:
    """Whether config.json names a *ForSequenceClassification model (a score head), as litllm and transformers write
    reward models."""
    try:
        architectures = json.loads((checkpoint_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(name.endswith("ForSequenceClassification") for name in architectures)

"""`litllm convert merge_lora`: a LoRA adapter folded into its base, as a full Hugging Face model dir."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from litllm.checkpoint import check_checkpoint_dir, is_model_dir_file, load_model, parse_dtype, save_checkpoint
from litllm.config import Config
from litllm.errors import UserError
from litllm.files import check_out_dir, refuse_to_overwrite
from litllm.lora import load_adapter, named_base
from litllm.lora import merge_lora as merge_lora_layers
from litllm.model import GPT


def merge_lora(adapter_dir: Path, out_dir: Path | None = None, base: Path | None = None,
               overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base model: a full Hugging Face model dir that any tool loads.

    Args:
        adapter_dir: a LoRA adapter dir (PEFT format, e.g. out/finetune/<run>/final).
        out_dir: where to write the merged model (default: <adapter_dir>-merged beside it).
        base: the base checkpoint dir (default: the one the adapter names in litllm.json or adapter_config.json).
        overwrite: replace a model dir at out_dir (only a model dir: any other file found there stops the command).
    """
    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir) if out_dir is not None else adapter_dir.with_name(f"{adapter_dir.name}-merged")
    base = adapter_base(adapter_dir, base)
    check_out_dir(out_dir, inputs=[adapter_dir, base])
    refuse_to_overwrite(out_dir, overwrite, owned=is_model_dir_file)
    model, base = merged_model(adapter_dir, base)
    save_checkpoint(model, out_dir, tokenizer_dir=adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base)
    _copy_generation_config(base, out_dir)
    print(f"Merged {adapter_dir} into {base} ({model.embed_tokens.weight.dtype}); saved to {out_dir}")
    return out_dir


def merged_model(adapter_dir: Path, base: Path | None = None) -> tuple[GPT, Path]:
    """The base model with the adapter merged in, in the base checkpoint's dtype, and the base dir.

    The merge happens in float32 on the base's original weights. An adapter trained with QLoRA (on a
    4-bit copy of the base) is merged into those original weights too, never into 4-bit ones: a merged
    4-bit model would round the update away.
    """
    base = adapter_base(adapter_dir, base)
    model = load_model(base, dtype=torch.float32)
    load_adapter(model, adapter_dir, base_checkpoint=base)
    model = merge_lora_layers(model)
    quantized = json.loads((adapter_dir / "litllm.json").read_text()).get("quantize") \
        if (adapter_dir / "litllm.json").is_file() else None
    if quantized:
        print(f"The adapter was trained on a {quantized}-quantized base: merging it into the original "
              f"full-precision weights of {base}, not into 4-bit ones")
    return model.to(parse_dtype(Config.from_hf(base).torch_dtype) or torch.float32), base


def adapter_base(adapter_dir: Path, base: Path | None) -> Path:
    """The base checkpoint of an adapter: `base` if given, else the one its files name."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter directory?")
    if base is None:
        named = named_base(adapter_dir)
        if not named or not Path(named).is_dir():
            raise UserError(f"{adapter_dir}: its base checkpoint {named!r} is not a local directory; "
                            "pass --base DIR with the model the adapter was trained on")
        base = Path(named)
    return check_checkpoint_dir(base)


def _copy_generation_config(source: Path, out_dir: Path) -> None:
    if (source / "generation_config.json").is_file() and not (out_dir / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out_dir / "generation_config.json")


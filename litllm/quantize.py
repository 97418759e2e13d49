"""QLoRA's frozen base: every `nn.Linear` of a model replaced by a bitsandbytes 4-bit or 8-bit layer.

The modes follow bitsandbytes: NF4 (the QLoRA paper's normal-float 4-bit) and FP4 quantize the weight in
blocks of 64 with one absmax per block; `-dq` also quantizes those absmax values (double quantization,
about 0.37 bits per weight less). int8 is LLM.int8(): one scale per output row, and activation columns
above 6.0 computed in 16 bits at inference. All of them run forward and backward on CPU and CUDA.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal, get_args

import torch
import torch.nn as nn

from litllm.errors import UserError
from litllm.model import plain_linear

QuantizeMode = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
QUANTIZE_MODES = get_args(QuantizeMode)
PIP_INSTALL = "pip install 'bitsandbytes>=0.50.2'"  # tested: 4-bit and int8 layers train on CPU


def quantize_model(
    model: nn.Module,
    mode: QuantizeMode,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` whose name does not end with one of `skip` by a frozen bitsandbytes layer.

    Layers are quantized one at a time on `device` (default: where each weight already is), so a model
    loaded on CPU can be quantized into a GPU it would not fit in as floats; the rest of the model then
    moves there too. 4-bit layers compute in `compute_dtype` (default: the weight's dtype).
    """
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    bnb = _import_bitsandbytes(mode)
    skip = tuple(skip)
    # names first, modules fetched one by one: holding a list of the float layers would keep them all alive
    names = [name for name, module in model.named_modules() if plain_linear(module) and not name.endswith(skip)]
    if mode != "bnb.int8":
        _check_cpu_4bit_rows(model, names, mode, device)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, _quantized_linear(bnb, getattr(parent, leaf), mode, compute_dtype, device))
    if device is not None:
        model.to(device)  # embeddings, norms and the skipped layers follow the quantized ones
    return model


def _quantized_linear(bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype | None, device) -> nn.Module:
    weight = linear.weight.detach().to(device or linear.weight.device)  # (out_features, in_features)
    has_bias = linear.bias is not None
    # built on the meta device: the float weight a bnb layer would allocate is replaced at once anyway
    if mode == "bnb.int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        int8_weight, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(int8_weight, requires_grad=False, has_fp16_weights=False,
                                         CB=int8_weight, SCB=row_scales)
    else:
        quant_type, double_quant = mode.removeprefix("bnb.").removesuffix("-dq"), mode.endswith("-dq")
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias,
                                  compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                                  quant_type=quant_type, device="meta")
        # .to() of a not yet quantized Params4bit quantizes it on that device
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, module=layer).to(weight.device)
        # On AVX512-BF16 CPUs an eval forward without grad repacks the weight for a bf16 inference kernel
        # that has no backward, so training after a validation pass would fail; keep one layout throughout.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(weight.device), requires_grad=False)
    return layer.train(linear.training)  # a fresh module starts in train mode; keep the model's mode


def _check_cpu_4bit_rows(model: nn.Module, names: list[str], mode: str, device) -> None:
    # bitsandbytes quantizes the flattened weight in blocks of 64, but its native CPU kernel dequantizes
    # row by row (0.50.2): a row length that is not a multiple of 64 gives silently wrong weights. Checked
    # before any layer is replaced, so an error leaves the model as it was.
    for name in names:
        linear = model.get_submodule(name)
        if torch.device(device or linear.weight.device).type == "cpu" and linear.in_features % 64:
            raise UserError(
                f"{mode} on CPU needs in_features divisible by 64, {name} has {linear.in_features} "
                f"(bitsandbytes' CPU kernel would dequantize it wrongly): use a GPU or bnb.int8"
            )


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out_features, in_features) a layer computes with, e.g. to merge a LoRA into it.

    4-bit layers give the dtype they were quantized from, int8 layers float32, `nn.Linear` its weight.
    """
    if plain_linear(module):
        return module.weight
    bnb = _import_bitsandbytes(type(module).__name__)
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        # the layer's first forward moves the row scales from the weight into its matmul state
        row_scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, row_scales)
    raise TypeError(f"dequantize_weight: {type(module).__name__} is neither nn.Linear nor a bitsandbytes linear")


def _import_bitsandbytes(needed_by: str):
    # bitsandbytes logs at import, on AVX512-BF16 CPUs, that the optional kernel of the bf16 inference
    # layout is missing; we never use that layout (see _quantized_linear), so the warning is only noise
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as error:
        raise UserError(f"{needed_by} needs bitsandbytes ({error}): {PIP_INSTALL}") from None
    finally:
        cpu_log.setLevel(level)
    return bitsandbytes

"""LoRA and DoRA by layer replacement: each targeted linear layer is wrapped in a `LoRALinear`, the rest of
the model is untouched. Adapters are saved and loaded in PEFT's format, so `peft.PeftModel.from_pretrained`
reads ours and we read PEFT's; the parameter names are PEFT's (`lora_A`, `lora_B`, `lora_magnitude_vector`).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from litllm.checkpoint import hf_to_litllm, litllm_to_hf
from litllm.errors import UserError
from litllm.lora_dropout import SHARED_DRAW, add_without_drops, keep_mask, kept_fraction, lora_dropout, without_drops
from litllm.model import Linear, autocast_weight, linear, plain_linear
from litllm.quantize import dequantize_weight

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
PEFT_PREFIX = "base_model.model."  # PeftModel(LoraModel(transformers model)) in front of every HF name
# PEFT's modules_to_save for task type SEQ_CLS: a reward model's head, by either name models give it
REWARD_HEADS = ["classifier", "score"]
_LORA_PARAM = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the model's linear layers; the base weights stay frozen.

    Attributes:
        r: rank of the learned update B @ A.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout probability on the adapter's input (the base layer sees the input unchanged); layers
            that read one input (q/k/v, gate/up) drop the same elements of it (SharedDraw).
        targets: Hugging Face names of the layers to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj,
            up_proj, down_proj, lm_head.
        dora: DoRA (arXiv 2402.09353): also learn the norm of each output row of the weight.
        rslora: rank-stabilized LoRA (arXiv 2312.03732): scale by alpha / sqrt(r), so higher ranks still learn.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dora: bool = False
    rslora: bool = False


class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))) around a frozen linear layer (plain or bitsandbytes 4/8-bit).

    With DoRA each output row of the combined weight W + scaling * B @ A is rescaled to a learned length
    (`lora_magnitude_vector`), computed as PEFT computes it: the row norms are detached, as the paper
    suggests (section 4.3); in eval mode or without dropout W x is taken from base(x), less its bias.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dora: bool = False,
                 rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = dropout  # probability; drawn once per input tensor (SharedDraw)
        weight = dequantize_weight(base)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        # A as nn.Linear's default init (as the LoRA paper's code and PEFT), B zero: training starts at the base
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if dora:  # row norms of the starting weight (B = 0), so DoRA also starts at the base model
            self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(weight.detach(), dim=1))
        else:
            self.lora_magnitude_vector = None
        self.enabled = True
        self.drawn: torch.Tensor | None = None  # the next forward's dropout mask, drawn ahead (draw_block_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.training and self.lora_magnitude_vector is None and self.frozen_plain_base():
            # the base layer's product in LowRank too, whose backward then adds the adapter's gradient for x into the
            # base layer's (in the product, with no tensor or autograd node of its own)
            weight = autocast_weight(self.base.weight)
            return LowRank.apply(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout, None, weight,
                                 self.base.bias, self.drawn)
        result = self.base(x)
        if self.lora_magnitude_vector is not None or not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # (under autocast the products cast x themselves: no round trip)
        if self.lora_magnitude_vector is not None:
            return (result + self._dora_extra(x, result)).to(result.dtype)
        if self.training:  # backward's products in the order that is fast for rank r, added into result (LowRank)
            return LowRank.apply(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout, result,
                                 None, None, self.drawn).to(result.dtype)
        # scaled in rank space (r columns, not out_features): the same product, fewer multiplications
        return (result + self.lora_B(self.lora_A(x) * self.scaling)).to(result.dtype)

    def frozen_plain_base(self) -> bool:
        """Whether the base is a plain linear layer (not quantized) that does not train, of the adapter's dtype."""
        return (plain_linear(self.base) and self.base.weight.dtype == self.lora_A.weight.dtype
                and not any(param.requires_grad for param in self.base.parameters()))

    def _dora_extra(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: (m / |W + sBA| - 1) W x + (m / |W + sBA|) s B A x."""
        weight = dequantize_weight(self.base).to(x.dtype)  # (out, in)
        with torch.no_grad():  # the row norms are constants for backward: cheaper, and stable (DoRA 4.3)
            delta = self.lora_B.weight @ self.lora_A.weight  # (out, in)
            weight_norm = torch.linalg.norm(weight + self.scaling * delta, dim=1)  # (out,)
        scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        if self.dropout == 0 or not self.training:
            base_result = result if self.base.bias is None else result - self.base.bias  # reuse base(x): W x
        else:  # dropout applies to W x too here, so W x is recomputed on the dropped input
            drops = SHARED_DRAW.drops_for(x, self.dropout, self.lora_A.weight) if self.drawn is None else self.drawn
            x = without_drops(x, drops) / kept_fraction(self.dropout, x.device)
            base_result = F.linear(x, weight)
        return (scale - 1) * base_result + scale * self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight (out, in) of one plain linear layer with this layer's output, in float32."""
        weight = dequantize_weight(self.base).float()
        combined = weight + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        if self.lora_magnitude_vector is None:
            return combined
        norm = torch.linalg.norm(combined, dim=1)
        return (self.lora_magnitude_vector.float() / norm).view(-1, 1) * combined


def plain_low_rank(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float,
                   base_out: torch.Tensor | None = None, base_weight: torch.Tensor | None = None,
                   base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """scaling * B A (dropout(x)), plus base_out or the base layer F.linear(x, base_weight, base_bias), the plain way
    (the mask as dropout_mask draws it): what LowRank computes, and the reference its test holds it to. Autograd keeps
    the dropped copy of x for A's gradient."""
    extra = F.linear(F.linear(lora_dropout(x, p), lora_A) * scaling, lora_B)
    if base_weight is not None:
        base_out = F.linear(x, base_weight, base_bias)
    return extra if base_out is None else base_out + extra


class LowRank(torch.autograd.Function):
    """base_out + scaling * B A (dropout(x)) (x: (..., in), A: (r, in), B: (out, r)) as a LoRA layer trains, where
    base_out is the base layer's output (..., out), or for a frozen plain base layer its product F.linear(x,
    base_weight, base_bias), computed here. B's product is added into base_out in place, and the backward is written
    out for three reasons.

    - Dropout keeps, of x's size, only x itself (which the other layers reading the same input, q/k/v or gate/up, and
      the block keep anyway) and what it dropped (draw_drops: the dropped positions, or a one-byte mask). Autograd
      would keep a dropped copy of x per adapted layer: for SmolLM2 with LoRA on all seven linear layers at 4 x 256
      tokens, peak RSS 4.54 GB, against 3.85 GB this way (benchmarks/RESULTS.md).
    - B's gradient is taken as (low_rank^T grad_out)^T, an (r, N) x (N, out) product. Autograd's linear backward
      computes grad_out^T low_rank, (out, N) x (N, r), so that the gradient comes out in the weight's layout; for
      rank r that product is 3-3.5x slower on CPU (MKL, N = 1024, r = 8: 1.9 vs 0.55 ms at out = 1536, 0.47 vs
      0.17 ms at out = 576).
    - With the base layer's weight, x's gradient is the base layer's with the adapter's added in by the product itself
      (add_without_drops): no (..., in) tensor for the adapter's part, no pass to add it, one autograd node per layer.

    The draw is dropout_mask's, as in plain_low_rank, so outputs and gradients equal that function's from the same
    seed (and PEFT's, given the same masks) but for rounding. At p = 0 nothing is drawn; `drops`, a mask drawn ahead
    (draw_block_dropout), is taken as it is.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, p, base_out, base_weight=None, base_bias=None, drops=None):
        if drops is None:
            drops = SHARED_DRAW.drops_for(x, p, lora_A)
        # dropout's 1 / (1 - p) applied in rank space (r columns), not to the input's: the same product, one pass
        # over x fewer (likewise in backward)
        scale = scaling / kept_fraction(p, x.device)
        low_rank = F.linear(SHARED_DRAW.dropped(x, drops), lora_A) * scale  # (..., r): kept
        ctx.save_for_backward(x, lora_A, lora_B, low_rank, drops, base_weight)
        ctx.scaling, ctx.p = scaling, p
        if base_weight is not None:
            base_out = linear(x, base_weight, base_bias)
        if base_out.dtype != low_rank.dtype or not base_out.is_contiguous():  # e.g. a 4-bit base's bfloat16 output
            return base_out + F.linear(low_rank, lora_B)
        if base_weight is None:
            ctx.mark_dirty(base_out)  # the base layer's own new output, which its backward does not keep
        # B's product added into the base layer's output by the product itself: no (..., out) tensor for it, and no
        # pass to add one
        base_out.view(-1, base_out.size(-1)).addmm_(low_rank.view(-1, low_rank.size(-1)), lora_B.to(low_rank.dtype).T)
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, low_rank, drops, base_weight = ctx.saved_tensors
        grad_out_of_sum = grad_out if ctx.needs_input_grad[5] else None  # base_out's
        dtype = low_rank.dtype  # the forward's compute dtype (bfloat16 under bf16 autocast)
        in_features = x.size(-1)
        grad_out = grad_out.to(dtype).reshape(-1, grad_out.size(-1))  # (N, out)
        low_rank = low_rank.reshape(-1, low_rank.size(-1))  # (N, r)
        grad_B = (low_rank.T @ grad_out).T.contiguous()  # (out, r), in the weight's layout: a copy of out x r
        # d loss / d (the dropped, rescaled input's rank-r image), rescaled: (N, r)
        grad_low_rank = (grad_out @ lora_B.to(dtype)) * (ctx.scaling / kept_fraction(ctx.p, x.device))
        grad_A = grad_low_rank.T @ SHARED_DRAW.dropped(x, drops).reshape(-1, in_features).to(dtype)  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if base_weight is None:  # the adapter's part (the base layer's backward adds its own)
                grad_x = without_drops(grad_low_rank @ lora_A.to(dtype), drops, in_place=True)
            else:
                grad_x = add_without_drops(linear(grad_out, base_weight.T), grad_low_rank, lora_A.to(dtype), drops)
            grad_x = grad_x.to(x.dtype).view(x.shape)
        return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), None, None, grad_out_of_sum, None, None, None


# the adapted layers of a block that read one input, in the order a forward reaches them: eager's draws (SharedDraw)
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def draw_block_dropout(block: nn.Module, x: torch.Tensor) -> None:
    """Draw the dropout of a block's adapted layers before the block runs compiled (compile_blocks_for_training), for
    the block's input x (..., hidden_size), and hand each layer its mask (LoRALinear.drawn); clear_block_dropout
    takes them back after. The draws stay out of the compiled graph (see dropout_mask) without a graph break per
    layer. Drawn in eager's order, one per input that layers share, from the same generator: the elements eager
    training drops from the same seed, as 0/1 masks (keep_mask), whose shape is the same at every step (the dropped
    positions eager keeps on CPU are as many as are drawn, a new shape to compile for at each step)."""
    layers = {name.rsplit(".", 1)[-1]: layer for name, layer in block.named_modules() if isinstance(layer, LoRALinear)}
    for names in SHARED_INPUTS:
        readers = [layers[name] for name in names if name in layers and layers[name].dropout > 0]
        if readers:
            like = x.new_empty((*x.shape[:-1], readers[0].in_features), dtype=torch.bool)  # its shape and device
            mask = keep_mask(like, readers[0].dropout)
            for layer in readers:
                layer.drawn = mask


def clear_block_dropout(block: nn.Module) -> None:
    for layer in block.modules():
        if isinstance(layer, LoRALinear):
            layer.drawn = None


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every layer named in `config.targets` in a LoRALinear and freeze all but the LoRA parameters."""
    unknown = [t for t in config.targets if t not in LINEAR_LAYERS]
    if unknown:
        raise UserError(f"unknown LoRA target(s) {unknown}; valid targets: {', '.join(LINEAR_LAYERS)}")
    if not 0 <= config.dropout < 1:
        raise UserError(f"--lora.dropout {config.dropout}: a probability from 0 up to (not including) 1")
    names = [name for name in _linear_layer_names(model) if name.rsplit(".", 1)[-1] in config.targets]
    return _wrap_layers(model, names, config)


def _linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in LINEAR_LAYERS]


def _wrap_layers(model: nn.Module, names: list[str], config: LoRAConfig) -> nn.Module:
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("the model already has LoRA layers")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.dora, config.rslora)
        setattr(parent, child, layer.train(model.training))  # an eval model stays in eval mode (no dropout)
    for name, param in model.named_parameters():
        # a reward model's new score head trains whole, as PEFT's modules_to_save, and is saved with the adapter
        param.requires_grad = bool(_LORA_PARAM.search(name)) or name == "score.weight"
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, under litllm names (`layers.0.attn.q_proj.lora_A.weight`), and a reward model's
    score head."""
    return {name: t for name, t in model.state_dict().items() if _LORA_PARAM.search(name) or name == "score.weight"}


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRALinear acts as its base layer: the base model, e.g. DPO's reference."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.enabled = enabled


@contextmanager
def adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block the adapters hold `weights` (named as lora_state_dict names them, e.g. a copy of them taken
    earlier) in place of their own: the model as it was then, for the memory of the adapters' small tensors only."""
    params = {name: p for name, p in model.named_parameters() if name in weights}
    if params.keys() != weights.keys():
        raise ValueError(f"not adapter weights of this model: {sorted(weights.keys() - params.keys())[:3]}")
    own = {name: p.data for name, p in params.items()}
    for name, p in params.items():
        p.data = weights[name]
    try:
        yield model
    finally:
        for name, p in params.items():
            p.data = own[name]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear with a plain linear layer (model.Linear) holding the merged weight (a quantized base is
    de-quantized first): the same logits, at the base model's cost."""
    for name, layer in list(lora_layers(model)):
        weight = dequantize_weight(layer.base)
        merged = Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(layer.merged_weight())
        if layer.base.bias is not None:
            merged.bias.copy_(layer.base.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
        if child == "lm_head" and getattr(getattr(model, "config", None), "tie_embeddings", False):
            # the merged output matrix is no longer the embedding: save it as its own tensor
            model.config = replace(model.config, tie_embeddings=False)
    return model


# ------------------------------------------------------------------------------------------ PEFT files


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: Path, base_checkpoint: Path,
                 quantize: str | None = None) -> Path:
    """Write a PEFT adapter dir (adapter_config.json, adapter_model.safetensors) and litllm.json naming
    the base checkpoint and, for QLoRA, how the base was quantized during training.

    A reward model's adapter is what PEFT writes for task type SEQ_CLS: its score head saved whole with it
    (modules_to_save), so PEFT loads it onto AutoModelForSequenceClassification."""
    reward = hasattr(model, "score")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_checkpoint = str(Path(base_checkpoint).resolve())
    tensors = {PEFT_PREFIX + litllm_to_hf(name): t.detach().contiguous().cpu()
               for name, t in lora_state_dict(model).items()}
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_checkpoint,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model),
        "exclude_modules": None,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": REWARD_HEADS if reward else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "auto_mapping": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    litllm_info = {"base_checkpoint": base_checkpoint, **({"quantize": quantize} if quantize else {})}
    (out_dir / "litllm.json").write_text(json.dumps(litllm_info, indent=2) + "\n")
    return out_dir


def named_base(adapter_dir: Path) -> str | None:
    """The base checkpoint an adapter dir names: litllm.json's (a resolved local path), else PEFT's
    base_model_name_or_path (a local path or a hub name); None if neither does."""
    named = None
    if (adapter_dir / "litllm.json").is_file():
        named = json.loads((adapter_dir / "litllm.json").read_text()).get("base_checkpoint")
    return named or json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")


def _target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's target_modules for the adapted layers: their leaf names, or, when only some layers of a kind
    are adapted, a regex matching exactly their HF module names."""
    adapted = [name for name, _ in lora_layers(model)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if len(adapted) == sum(name.rsplit(".", 1)[-1] in leaves for name in _linear_layer_names(model)):
        return leaves
    return "|".join(re.escape(_hf_module_name(name)) for name in adapted)


def _hf_module_name(name: str) -> str:
    return litllm_to_hf(f"{name}.weight").removesuffix(".weight")


# keys of adapter_config.json whose non-default values change what the adapter computes, and litllm lacks
_UNSUPPORTED_KEYS = (
    "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "lora_bias", "layers_to_transform",
    "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
    "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
)


def load_adapter(model: nn.Module, adapter_dir: Path, base_checkpoint: Path | str | None = None) -> LoRAConfig:
    """Apply the PEFT LoRA adapter in `adapter_dir` (written by litllm or PEFT) to `model` and load its weights.

    `base_checkpoint` is the directory `model` came from; it is only named in error messages.
    """
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter directory?")
    if not weights_file.is_file():
        hint = " (pickled adapter_model.bin found; litllm reads safetensors only)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors{hint}")
    try:
        peft = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(peft, dict) or not isinstance(peft.get("r"), int) or peft["r"] < 1:
        raise UserError(f"{config_file}: expected a PEFT LoRA config with a positive integer 'r'")
    if peft.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type is {peft.get('peft_type')!r}; litllm loads LORA adapters only")
    reward = hasattr(model, "score")
    if peft.get("task_type") == "SEQ_CLS" and not reward:
        raise UserError(f"{adapter_dir}: a reward model's adapter (task_type SEQ_CLS) scores text but does not "
                        "generate it; load it with `RewardModel.load(base, adapter=...)`")
    if reward and peft.get("task_type") != "SEQ_CLS":
        raise UserError(f"{adapter_dir}: task_type {peft.get('task_type')}, not a reward model's adapter (SEQ_CLS, "
                        "from `litllm finetune reward`)")
    for key in _UNSUPPORTED_KEYS:
        value = peft.get(key)
        if reward and key == "modules_to_save" and value and set(value) <= set(REWARD_HEADS):
            continue  # the score head, saved whole
        if not (value is None or value is False or value == "none" or value == {} or value == []):
            raise UserError(f"{config_file}: '{key}': {json.dumps(value)} is not supported by litllm")
    init = peft.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "eva", "orthogonal"):
        raise UserError(f"{config_file}: 'init_lora_weights': {json.dumps(init)} changes the base weights as "
                        "the adapter loads, which litllm does not do; convert the adapter to plain LoRA with PEFT "
                        "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    config = LoRAConfig(r=peft["r"], alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                        dora=bool(peft.get("use_dora")), rslora=bool(peft.get("use_rslora")))
    names = _peft_targets(model, peft.get("target_modules"), config_file)
    config.targets = [leaf for leaf in LINEAR_LAYERS if any(name.rsplit(".", 1)[-1] == leaf for name in names)]
    _wrap_layers(model, names, config)
    _load_weights(model, weights_file, base_checkpoint, peft.get("base_model_name_or_path"))
    return config


def _peft_targets(model: nn.Module, target_modules: list[str] | str | None, config_file: Path) -> list[str]:
    """litllm names of the layers PEFT would adapt: a list entry matches a module name or its ending after a
    dot; a string is a regex matched against the whole name; "all-linear" is every linear layer but lm_head."""
    candidates = {name: _hf_module_name(name) for name in _linear_layer_names(model)}
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            names = [name for name, hf in candidates.items() if hf != "lm_head"]
        else:
            pattern = _compile_target_pattern(target_modules, config_file)
            names = [name for name, hf in candidates.items() if pattern.fullmatch(hf)]
        if not names:
            raise UserError(f"{config_file}: target_modules {target_modules!r} matches no layer litllm can adapt "
                            f"({', '.join(LINEAR_LAYERS)})")
        return names
    if not target_modules:
        raise UserError(f"{config_file}: 'target_modules' is missing")
    names = []
    for target in target_modules:
        matched = [name for name, hf in candidates.items() if hf == target or hf.endswith(f".{target}")]
        if not matched:
            raise UserError(f"{config_file}: target_modules entry '{target}' names no layer litllm can adapt "
                            f"({', '.join(LINEAR_LAYERS)})")
        names += matched
    return [name for name in candidates if name in names]  # model order, each once


def _compile_target_pattern(target_modules: str, config_file: Path) -> re.Pattern:
    """PEFT's regex form of target_modules, refused when it does not compile or is longer than any real one (a
    pattern from a file is code that runs: a short limit keeps its matching against module names quick)."""
    if len(target_modules) > 4096:
        raise UserError(f"{config_file}: target_modules is a {len(target_modules):,}-character pattern; "
                        "litllm reads patterns of up to 4,096 characters")
    try:
        return re.compile(target_modules)
    except re.error as error:
        raise UserError(f"{config_file}: target_modules {target_modules[:80]!r} is not a valid regex ({error})") \
            from None


@torch.no_grad()
def _load_weights(model: nn.Module, weights_file: Path, base_checkpoint, trained_on: str | None) -> None:
    adapter_dir = weights_file.parent
    base = base_checkpoint or "the base model"
    if trained_on:
        adapter_dir = f"{adapter_dir} (trained on {trained_on})"
    incompatible = f"incompatible adapter and base: adapter {adapter_dir} does not fit base {base}"
    expected = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    with safe_open(weights_file, framework="pt") as f:
        for peft_name in f.keys():
            name = hf_to_litllm(peft_name.removeprefix(PEFT_PREFIX))
            # PEFT also stores the base weight of a targeted lm_head/embedding ("save_embedding_layers")
            name = name.replace(".base_layer.", ".base.")
            tensor = f.get_tensor(peft_name)
            param = expected.get(name)
            if param is None:
                raise UserError(f"{incompatible}: the base has no parameter for '{peft_name}'")
            if param.shape != tensor.shape:
                raise UserError(f"{incompatible}: '{peft_name}' has shape {list(tensor.shape)}, "
                                f"the base needs {list(param.shape)}")
            param.copy_(tensor)
            loaded.add(name)
    missing = sorted(name for name in expected
                     if (_LORA_PARAM.search(name) or name == "score.weight") and name not in loaded)
    if missing:
        raise UserError(f"{incompatible}: the adapter lacks {len(missing)} LoRA tensors the base needs, "
                        f"e.g. '{PEFT_PREFIX + litllm_to_hf(missing[0])}'")

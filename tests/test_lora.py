"""LoRA/DoRA against PEFT on tiny transformers models: same weights, same logits; adapters cross-load both ways."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_models import save_tiny_hf_model
from litllm.checkpoint import litllm_to_hf, load_model
from litllm.errors import UserError
from litllm.lora import (
    LINEAR_LAYERS, LoRAConfig, LoRALinear, LowRank, apply_lora, count_parameters, disable_adapters, load_adapter,
    lora_state_dict, merge_lora, plain_low_rank, save_adapter,
)
from litllm.lora_dropout import dropout_mask, dropped_positions, kept_fraction
import litllm.model
from litllm.model import frozen_autocast_copy, plain_linear

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("llama")
    return out_dir, save_tiny_hf_model("llama", out_dir)


def input_ids(batch=2, length=12, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B (and magnitudes off the weight norms), so the adapter visibly changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))


def lora_model(checkpoint_dir, config: LoRAConfig, seed: int = 0):
    model = apply_lora(load_model(checkpoint_dir), config)
    randomize_lora(model, seed)
    return model


def peft_model(hf_model, config: LoRAConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf_model, LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.targets,
        use_dora=config.dora, use_rslora=config.rslora, task_type="CAUSAL_LM"))


@torch.no_grad()
def copy_lora_into_peft(model, peft):
    """Our LoRA tensors into PEFT's modules, found by their HF module names."""
    hf_model = peft.base_model.model
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            target = hf_model.get_submodule(litllm_to_hf(f"{name}.weight").removesuffix(".weight"))
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.lora_magnitude_vector is not None:
                target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_forward_equals_peft(llama, tmp_path, dora):
    checkpoint_dir, _ = llama
    config = LoRAConfig(r=4, alpha=12, dropout=0.0, targets=ALL_LINEAR + ["lm_head"], dora=dora)
    model = lora_model(checkpoint_dir, config)
    peft = peft_model(save_tiny_hf_model("llama", tmp_path), config).eval()
    copy_lora_into_peft(model, peft)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft(x).logits, atol=1e-5, rtol=0)


class GivenMasks(nn.Module):
    """Dropout in PEFT's place that applies the masks litllm drew, in call order: the next one for a new input, the
    last one again for the input the layer before read (litllm draws one mask per input: q and v read the same)."""

    def __init__(self, masks: list[torch.Tensor], p: float, last: dict) -> None:
        super().__init__()
        self.masks, self.p, self.last = masks, p, last  # last: shared by all of them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last.get("x") is not x:
            self.last.update(x=x, mask=self.masks.pop(0))
        return x * self.last["mask"] / (1 - self.p)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_training_forward_and_grads_equal_peft_with_dropout(llama, tmp_path, monkeypatch, dora):
    """In training mode with dropout: PEFT's dropout layers given the masks litllm drew (litllm draws its own way, see
    lora_dropout.dropout_mask), layer by layer. p = 1/4 is a multiple of 1/65536: the scale 1 / (1 - p) is PEFT's own."""
    import litllm.lora_dropout

    checkpoint_dir, _ = llama
    config = LoRAConfig(r=4, alpha=8, dropout=0.25, targets=["q_proj", "v_proj", "down_proj"], dora=dora)
    model = lora_model(checkpoint_dir, config).train()
    peft = peft_model(save_tiny_hf_model("llama", tmp_path), config).train()
    copy_lora_into_peft(model, peft)
    masks = []
    draw = litllm.lora_dropout.keep_mask
    monkeypatch.setattr(litllm.lora_dropout, "keep_mask", lambda x, p: masks.append(draw(x, p)) or masks[-1])
    last = {}
    for module in peft.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = GivenMasks(masks, config.dropout, last)
    x = input_ids()
    ours = model(x)
    dropped = 1 - float(torch.cat([mask.flatten() for mask in masks]).float().mean())
    assert len(masks) == 2 * 2 and 0.2 < dropped < 0.3  # per layer: q and v's input, down's
    theirs = peft(x).logits
    assert masks == []  # PEFT applied each
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for name in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]:  # q and v: one dropped input for both
        ours_grad = model.layers[1].get_submodule(name.removeprefix("self_")).lora_A.weight.grad
        theirs_grad = peft.base_model.model.model.layers[1].get_submodule(name).lora_A["default"].weight.grad
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.5], ids=["gaps", "thresholds"])
def test_dropout_masks_keep_each_element_independently_with_the_given_probability(p):
    # four 16-bit draws from each 64-bit one (thresholds), or the gaps between drops: each lane of four, and each pair
    # of lanes, is checked; 999,999 elements (not a multiple of 4) so the last draw is cut
    torch.manual_seed(0)
    like = torch.empty(999_999, dtype=torch.bool)
    mask = dropout_mask(like, p)
    assert mask.dtype == torch.bool and mask.shape == like.shape
    lanes = mask[:999_996].view(-1, 4).double()  # (draws, 4)
    keep, n = kept_fraction(p, like.device), lanes.size(0)
    assert abs(keep - (1 - p)) <= 1 / 131072  # p to the nearest multiple of 1/65536 (thresholds), or p itself
    for lane in range(4):  # each within 5 standard deviations of its expectation
        assert abs(lanes[:, lane].mean() - keep) < 5 * (keep * (1 - keep) / n) ** 0.5
        for other in range(lane + 1, 4):
            both = lanes[:, lane] * lanes[:, other]
            assert abs(both.mean() - keep ** 2) < 5 * (keep ** 2 * (1 - keep ** 2) / n) ** 0.5
    assert not torch.equal(dropout_mask(like, p), mask)  # a new draw each call
    torch.manual_seed(0)
    assert torch.equal(dropout_mask(like, p), mask)  # from the global generator: the seed decides


def test_dropped_positions_drawn_a_few_at_a_time_are_the_same():
    """The gaps are drawn in blocks until they pass the end: blocks of 7 draws give the positions one block gives."""
    torch.manual_seed(3)
    positions = dropped_positions(10_000, 0.05)
    torch.manual_seed(3)
    assert torch.equal(dropped_positions(10_000, 0.05, draws=7), positions)
    assert positions.dtype == torch.int64 and 0 <= positions[0] and positions[-1] < 10_000
    assert bool((positions.diff() > 0).all()) and abs(len(positions) - 500) < 5 * (500 * 0.95) ** 0.5


def saved_for_backward(function, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`function(*args)` and the tensors autograd keeps for its backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return function(*args), saved


def test_layers_reading_one_input_drop_the_same_elements_and_a_second_forward_draws_anew(monkeypatch):
    """q, k and v (gate and up) read one tensor: one dropout draw for it, and one dropped copy in forward and in
    backward; outputs and gradients are those of each layer applied to x times that mask."""
    import litllm.lora_dropout

    torch.manual_seed(0)
    p = 0.05
    layers = [LoRALinear(nn.Linear(64, 32), r=4, alpha=8, dropout=p).train() for _ in range(2)]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    draws, draw = [], litllm.lora_dropout.draw_drops
    monkeypatch.setattr(litllm.lora_dropout, "draw_drops", lambda x, p: draws.append(draw(x, p)) or draws[-1])
    x = torch.randn(8, 64, requires_grad=True)
    outs = [layer(x) for layer in layers]
    assert len(draws) == 1 and draws[0].numel() > 0
    sum(out.square().sum() for out in outs).backward()

    mask = torch.ones(x.numel()).index_fill_(0, draws[0], 0).view_as(x)
    reference_x = x.detach().requires_grad_()
    adapters = [(layer.lora_A.weight.detach().requires_grad_(), layer.lora_B.weight.detach().requires_grad_())
                for layer in layers]
    references = [layer.base(reference_x) + layer.scaling * F.linear(F.linear(reference_x * mask / (1 - p), A), B)
                  for layer, (A, B) in zip(layers, adapters)]
    sum(ref.square().sum() for ref in references).backward()
    pairs = [*zip(outs, references), (x.grad, reference_x.grad)]
    pairs += [(ours, reference) for layer, (A, B) in zip(layers, adapters)
              for ours, reference in ((layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad))]
    for ours, reference in pairs:  # rounding relative to the largest element (1 / (1 - p) is applied in rank space)
        torch.testing.assert_close(ours, reference, rtol=1.3e-6, atol=1.3e-6 * float(reference.abs().max()))
    layers[0](x)  # the same layer again on the same input: a new draw
    layers[1](x.clone())  # another input
    assert len(draws) == 3 and not torch.equal(draws[1], draws[0])


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3], ids=["no-dropout", "dropout-gaps", "dropout-thresholds"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("base", ["output", "weight"])
def test_low_rank_equals_the_plain_version_and_keeps_no_dropped_copy_of_its_input(autocast, p, base):
    generator = torch.Generator().manual_seed(0)
    x, lora_A, lora_B, weight = (torch.randn(shape, generator=generator, requires_grad=True)
                                 for shape in [(2, 6, 32), (4, 32), (24, 4), (24, 32)])
    bias = torch.randn(24, generator=generator)
    results = {}
    for name, function in (("fused", LowRank.apply), ("plain", plain_low_rank)):
        torch.manual_seed(7)  # the same dropout mask for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if base == "output":
                # the base layer's output, which LowRank adds to in place (of x detached: x's gradient is the adapter's)
                out, saved = saved_for_backward(function, x, lora_A, lora_B, 2.0, p, x.detach() @ weight.T)
                wrt = (x, lora_A, lora_B, weight)
            else:  # a frozen base layer's weight and bias: x's gradient is the base layer's and the adapter's
                frozen = weight.detach().to(torch.bfloat16) if autocast else weight.detach()
                out, saved = saved_for_backward(function, x, lora_A, lora_B, 2.0, p, None, frozen, bias)
                wrt = (x, lora_A, lora_B)
        grads = torch.autograd.grad(out.float().square().sum(), wrt)
        results[name] = out, grads, saved
    (fused, fused_grads, fused_saved), (plain, plain_grads, plain_saved) = results["fused"], results["plain"]
    fused_saved, positions = [t for t in fused_saved if t.numel() == x.numel()], [
        t for t in fused_saved if t.dtype == torch.int64]
    plain_saved = [t for t in plain_saved if t.numel() == x.numel()]
    # equal but for rounding: the fused version applies dropout's 1 / (1 - p) to the rank-r product, not to x. Float32
    # rounding is relative to the size of the summed terms, so the tolerance is relative to the largest element
    # (assert_close's own rtol for each dtype: bfloat16's under autocast)
    for ours, reference in zip((fused, *fused_grads), (plain, *plain_grads)):
        rtol = 1.6e-2 if autocast else 1.3e-6
        torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol * float(reference.abs().max()))
    # where x is dropped its gradient is the base layer's alone, exactly: none with a base output, else the base layer's
    # product with the output's gradient (that of out.float().square().sum())
    x_base_grad = torch.zeros_like(x)
    if base == "weight":
        x_base_grad = F.linear((2 * fused).flatten(0, 1), frozen.T).view_as(x).to(x.dtype)
    dropped = fused_grads[0] == x_base_grad
    assert (x.grad is None) and abs(dropped.float().mean() - p) < 0.15  # about p of x is dropped
    # besides x (and a frozen base weight): the plain version keeps a dropped copy of x, the fused one only a one-byte
    # mask (thresholds) or the dropped positions (gaps), nothing at p = 0
    assert any(t.is_floating_point() for t in plain_saved if t.data_ptr() != x.data_ptr())
    assert [t.dtype for t in fused_saved if t.data_ptr() != x.data_ptr()] == [torch.uint8] * (p > 0.1)
    assert [t.numel() == int(dropped.sum()) for t in positions] == [True] * (0 < p <= 0.1)


def test_under_autocast_a_bfloat16_input_reaches_the_adapter_as_it_is(llama):
    """Under bf16 autocast attention's output and SwiGLU's are bfloat16: o_proj and down_proj take them so, and their
    adapters keep no float32 copy for backward, with the outputs and gradients of the float32 round trip (autocast
    casts back to bfloat16 before each product), bit for bit; B's product is added to the base output within the
    product (addmm), as LowRank adds it, and the adapter's gradient for x to the base layer's."""
    model = apply_lora(load_model(llama[0]), LoRAConfig(r=4, targets=ALL_LINEAR, dropout=0.0)).train()
    randomize_lora(model)
    block, seen = model.layers[0], {}
    for name, layer in (("o_proj", block.attn.o_proj), ("down_proj", block.mlp.down_proj)):
        layer.register_forward_pre_hook(lambda module, args, name=name: seen.update({name: args[0].dtype}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids())
    assert seen == {"o_proj": torch.bfloat16, "down_proj": torch.bfloat16}

    layer = block.mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 5, layer.out_features, dtype=torch.bfloat16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, saved = saved_for_backward(layer, x)
        low_rank = F.linear(x.float(), A) * layer.scaling
        expected = torch.addmm(layer.base(x).flatten(0, 1), low_rank.flatten(0, 1), B.T).view_as(ours)
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape]
    assert torch.equal(ours, expected)
    ours_grads, expected_grads = torch.autograd.grad(ours, (x, A, B), grad), torch.autograd.grad(expected, (x, A, B), grad)
    for a, b in zip(ours_grads[1:], expected_grads[1:]):
        assert torch.equal(a, b)
    # x's gradient: the base layer's (its bfloat16 weight) with the adapter's added within the product
    rows = grad.flatten(0, 1)
    grad_low_rank = (rows @ B.to(torch.bfloat16)) * layer.scaling
    expected_x = torch.addmm(rows @ layer.base.weight.to(torch.bfloat16), grad_low_rank, A.to(torch.bfloat16))
    assert torch.equal(ours_grads[0], expected_x.view_as(x))
    assert not torch.equal(ours_grads[0], expected_grads[0])  # autograd's sums the two products' rounded results


def test_under_autocast_a_frozen_weight_is_cast_once_while_it_is_unchanged(llama, monkeypatch):
    """A LoRA base weight under CPU bf16 autocast: one bfloat16 copy from forward to forward, taken anew when the
    weight changes in place, none kept from a forward without gradients; the logits are those of autocast's own casts,
    bit for bit."""
    model = lora_model(llama[0], LoRAConfig(r=4, targets=ALL_LINEAR, dropout=0.0)).train()
    weight = model.layers[0].mlp.up_proj.base.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert frozen_autocast_copy(weight) is not frozen_autocast_copy(weight)
        kept = frozen_autocast_copy(weight)
        assert kept is frozen_autocast_copy(weight) and torch.equal(kept, weight.to(torch.bfloat16))
        logits = model(input_ids())
        with torch.no_grad():
            weight.mul_(-1)  # in place: the same tensor and data, a new version
        again = frozen_autocast_copy(weight)
        assert again is not kept and torch.equal(again, weight.to(torch.bfloat16))
        changed = model(input_ids())
        monkeypatch.setattr(litllm.model, "frozen_autocast_copy", lambda weight: weight)  # autocast casts each time
        assert torch.equal(model(input_ids()), changed)
        with torch.no_grad():
            weight.mul_(-1)
        assert torch.equal(model(input_ids()), logits) and not torch.equal(logits, changed)


def test_only_lora_parameters_train(llama):
    config = LoRAConfig(r=2, targets=["q_proj", "lm_head"], dora=True)
    model = apply_lora(load_model(llama[0]), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 3 * 3  # A, B, magnitude for 2 q_proj and lm_head
    # q_proj 64 -> 64 and lm_head 64 -> 128 at rank 2, plus one magnitude per output row
    assert count_parameters(model) == 2 * (2 * 64 + 64 * 2 + 64) + (2 * 64 + 128 * 2 + 128)
    assert torch.equal(model(input_ids()), load_model(llama[0])(input_ids()))  # B = 0: starts at the base


@pytest.mark.parametrize("family,dora", [("llama", False), ("llama", True), ("tied", True)])
def test_lora_merge_equals_unmerged_forward(tmp_path, family, dora):
    save_tiny_hf_model(family, tmp_path)
    model = lora_model(tmp_path, LoRAConfig(r=4, alpha=16, targets=ALL_LINEAR + ["lm_head"], dora=dora))
    x = input_ids()
    with torch.no_grad():
        unmerged = model(x)
        merged_model = merge_lora(model)
        merged = merged_model(x)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert plain_linear(merged_model.layers[0].attn.q_proj)
    assert merged_model.layers[0].attn.q_proj.bias is None and merged_model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    if family == "tied":  # the merged lm_head differs from the embedding: saved as its own tensor from now on
        assert not merged_model.config.tie_embeddings
        assert merged_model.lm_head.weight is not merged_model.embed_tokens.weight


def test_qlora_merge_into_dequantized_weight_equals_unmerged(llama):
    pytest.importorskip("bitsandbytes")
    from litllm.quantize import quantize_model

    # bitsandbytes' CPU 4-bit kernel needs in_features divisible by 64: down_proj (96) stays in float
    model = quantize_model(load_model(llama[0]), "bnb.nf4", skip=("lm_head", "down_proj"))
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "gate_proj", "down_proj"], dora=True))
    randomize_lora(model)
    x = input_ids()
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    assert plain_linear(model.layers[0].attn.q_proj) and plain_linear(model.layers[0].mlp.gate_proj)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_disable_adapters_gives_base_logits(llama):
    model = lora_model(llama[0], LoRAConfig(targets=ALL_LINEAR, dora=True))
    x = input_ids()
    with torch.no_grad():
        adapted = model(x)
        with disable_adapters(model):
            base = model(x)
        assert torch.equal(base, load_model(llama[0])(x))
        assert not torch.allclose(adapted, base)
        assert torch.equal(model(x), adapted)  # enabled again after the block


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_litllm_adapter_loads_in_peft(llama, tmp_path, dora):
    from peft import PeftConfig, PeftModel

    checkpoint_dir, _ = llama
    config = LoRAConfig(r=4, alpha=8, targets=ALL_LINEAR + ["lm_head"], dora=dora)
    model = lora_model(checkpoint_dir, config)
    save_adapter(model, config, tmp_path / "adapter", base_checkpoint=checkpoint_dir)
    assert PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(checkpoint_dir.resolve())
    assert json.loads((tmp_path / "adapter" / "litllm.json").read_text()) == {
        "base_checkpoint": str(checkpoint_dir.resolve())}
    hf_base = save_tiny_hf_model("llama", tmp_path / "base")
    peft = PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, model(x), atol=1e-5, rtol=0)


def test_adapter_of_some_layers_round_trips_through_peft(llama, tmp_path):
    """An adapter on only some layers of a kind is saved with a target regex that PEFT and litllm both read."""
    from peft import PeftModel

    checkpoint_dir, _ = llama
    config = LoRAConfig(r=4, alpha=8, targets=["q_proj", "up_proj"])
    model = lora_model(checkpoint_dir, config)
    model.layers[1].attn.q_proj = model.layers[1].attn.q_proj.base  # drop one adapted layer
    save_adapter(model, config, tmp_path / "adapter", base_checkpoint=checkpoint_dir)
    target = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str)
    x = input_ids()
    peft = PeftModel.from_pretrained(save_tiny_hf_model("llama", tmp_path / "base"), tmp_path / "adapter").eval()
    reloaded = load_model(checkpoint_dir)
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


PEFT_ADAPTERS = {
    "llama": ("llama", dict(target_modules=ALL_LINEAR)),
    "llama-rslora-dora": ("llama", dict(target_modules=["q_proj", "v_proj", "gate_proj"], use_rslora=True,
                                        use_dora=True)),
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "llama-regex": ("llama", dict(target_modules=r".*\.1\.(self_attn|mlp)\.(k_proj|down_proj)")),
    # q/k/v have biases: DoRA rescales W x, not the bias
    "qwen2-dora": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)),
    "tied-lm-head": ("tied", dict(target_modules=["q_proj", "lm_head"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(PEFT_ADAPTERS))
def test_peft_adapter_loads_in_litllm(tmp_path, case):
    from peft import LoraConfig, get_peft_model

    family, kwargs = PEFT_ADAPTERS[case]
    hf_model = save_tiny_hf_model(family, tmp_path / "base")
    peft = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM", **kwargs))
    randomize_lora(peft)
    peft.save_pretrained(tmp_path / "adapter")
    model = load_model(tmp_path / "base")
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.r, config.alpha, config.dropout) == (4, 16, 0.1)
    assert config.rslora == kwargs.get("use_rslora", False) and config.dora == kwargs.get("use_dora", False)
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft.eval()(x).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def litllm_adapter(llama, tmp_path_factory):
    checkpoint_dir, _ = llama
    config = LoRAConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "down_proj"])
    out_dir = tmp_path_factory.mktemp("adapter")
    return save_adapter(lora_model(checkpoint_dir, config), config, out_dir, base_checkpoint=checkpoint_dir)


def edited_adapter(adapter_dir, out_dir, **changes):
    """A copy of the adapter with adapter_config.json keys changed."""
    out_dir.mkdir()
    (out_dir / "adapter_model.safetensors").symlink_to(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (out_dir / "adapter_config.json").write_text(json.dumps(config | changes))
    return out_dir


def test_adapter_with_other_rank_is_incompatible(llama, litllm_adapter, tmp_path):
    adapter = edited_adapter(litllm_adapter, tmp_path / "r8", r=8)
    with pytest.raises(UserError, match="incompatible adapter and base") as error:
        load_adapter(load_model(llama[0]), adapter, base_checkpoint=llama[0])
    assert str(adapter) in str(error.value) and str(llama[0]) in str(error.value)


def test_adapter_of_other_base_is_incompatible(litllm_adapter, tmp_path):
    save_tiny_hf_model("qwen3", tmp_path / "qwen3")  # head_dim 24: q_proj and k_proj have other shapes
    with pytest.raises(UserError, match="incompatible adapter and base.*_proj.*has shape"):
        load_adapter(load_model(tmp_path / "qwen3"), litllm_adapter, base_checkpoint=tmp_path / "qwen3")


def test_adapter_missing_tensors_is_incompatible(llama, litllm_adapter, tmp_path):
    adapter = edited_adapter(litllm_adapter, tmp_path / "more", target_modules=["q_proj", "k_proj", "down_proj",
                                                                                  "up_proj"])
    with pytest.raises(UserError, match="incompatible adapter and base.*lacks 4 LoRA tensors.*up_proj"):
        load_adapter(load_model(llama[0]), adapter)


@pytest.mark.parametrize("key,value", [("rank_pattern", {"q_proj": 2}), ("modules_to_save", ["lm_head"]),
                                       ("bias", "all"), ("peft_type", "IA3"), ("init_lora_weights", "pissa")])
def test_adapter_settings_litllm_cannot_honour_are_refused(llama, litllm_adapter, tmp_path, key, value):
    adapter = edited_adapter(litllm_adapter, tmp_path / key, **{key: value})
    with pytest.raises(UserError, match=f"adapter_config.json: .*{key}"):
        load_adapter(load_model(llama[0]), adapter)


def test_unknown_targets_are_refused(llama, litllm_adapter, tmp_path):
    with pytest.raises(UserError, match="unknown LoRA target.*'qkv_proj'.*valid targets: q_proj"):
        apply_lora(load_model(llama[0]), LoRAConfig(targets=["q_proj", "qkv_proj"]))
    adapter = edited_adapter(litllm_adapter, tmp_path / "embed", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(UserError, match="adapter_config.json: target_modules entry 'embed_tokens'"):
        load_adapter(load_model(llama[0]), adapter)
    assert set(LINEAR_LAYERS) == set(ALL_LINEAR) | {"lm_head"}
    with pytest.raises(UserError, match=r"--lora.dropout 1.0: a probability from 0 up to \(not including\) 1"):
        apply_lora(load_model(llama[0]), LoRAConfig(dropout=1.0))


def test_llm_load_with_adapter(llama, litllm_adapter, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from litllm import LLM

    checkpoint_dir, _ = llama
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base_dir / name).symlink_to(checkpoint_dir / name)
    vocab = {f"t{i}": i for i in range(127)} | {"<unk>": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="t0").save_pretrained(base_dir)

    expected = load_model(checkpoint_dir)
    load_adapter(expected, litllm_adapter)
    llm = LLM.load(base_dir, adapter=litllm_adapter, device="cpu")
    assert not any(isinstance(m, LoRALinear) for m in llm.model.modules())  # merged for decoding
    x = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x), expected(x), atol=1e-5, rtol=0)
    assert isinstance(llm.generate("t5 t6 t7", max_new_tokens=3), str)

"""QLoRA's frozen base: bitsandbytes layers in place of nn.Linear, close to the float model, trainable through."""
import copy
import sys
import weakref

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn

import litllm.quantize
from litllm.config import Config
from litllm.errors import UserError
from litllm.model import GPT, plain_linear
from litllm.quantize import QUANTIZE_MODES, dequantize_weight, quantize_model

# every in_features a multiple of 64, bitsandbytes' 4-bit block (see test_cpu_4bit_rows_...)
TINY = Config(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, n_layers=2,
              n_heads=4, n_kv_heads=2, attention_bias=True, max_seq_len=64)
QUANTIZED_LAYER = {"bnb.int8": bnb.nn.Linear8bitLt}  # every other mode: Linear4bit
FOUR_BIT = [mode for mode in QUANTIZE_MODES if mode != "bnb.int8"]


@pytest.fixture(scope="module")
def float_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so a dropped bias shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model


def quantized(float_model: GPT, mode: str) -> GPT:
    return quantize_model(copy.deepcopy(float_model), mode)


def input_ids(batch=2, length=24):
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_every_linear_but_lm_head_becomes_a_frozen_bnb_layer(float_model, mode):
    model = quantized(float_model, mode)
    targets = {name for name, m in float_model.named_modules() if plain_linear(m) and name != "lm_head"}
    assert set(bnb_layers(model)) == targets and len(targets) == 7 * TINY.n_layers
    for name, layer in bnb_layers(model).items():
        assert isinstance(layer, QUANTIZED_LAYER.get(mode, bnb.nn.Linear4bit))
        original = float_model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (original.in_features, original.out_features)
        if original.bias is not None:
            assert torch.equal(layer.bias, original.bias)
    assert plain_linear(model.lm_head) and torch.equal(model.lm_head.weight, float_model.lm_head.weight)
    assert not any(p.requires_grad for layer in bnb_layers(model).values() for p in layer.parameters())


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
@torch.no_grad()
def test_quantized_logits_are_close_to_float_logits(float_model, mode):
    x = input_ids()
    expected = float_model(x)
    actual = quantized(float_model, mode)(x)
    # Error relative to how much the logits vary: measured 0.10 (nf4), 0.14 (fp4), 0.006 (int8). 4-bit
    # weights carry ~10% rms error each, so the bound is loose but still far below 1.0, where the
    # quantized model would tell us nothing about the float one.
    relative_error = (actual - expected).pow(2).mean().sqrt() / expected.std()
    assert relative_error < (0.03 if mode == "bnb.int8" else 0.25)


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_dequantized_weight_is_close_to_the_original_and_is_the_weight_the_layer_computes_with(float_model, mode):
    x = torch.randn(3, 5, 128, requires_grad=True)
    for name, layer in bnb_layers(quantized(float_model, mode).train()).items():
        original = float_model.get_submodule(name).weight
        before_forward = dequantize_weight(layer)
        assert before_forward.shape == original.shape
        # per-weight rms error: 4-bit ~0.09 (nf4) / ~0.12 (fp4) of the weights' rms, int8 < 0.01
        error = (before_forward.float() - original).norm() / original.norm()
        assert error < (0.01 if mode == "bnb.int8" else 0.15)
        inputs = x[..., :layer.in_features]
        out = layer(inputs)  # the first forward of an int8 layer moves its scales: dequantize must follow
        weight = dequantize_weight(layer)
        torch.testing.assert_close(weight, before_forward, atol=0, rtol=0)
        torch.testing.assert_close(out, nn.functional.linear(inputs, weight.to(out.dtype), layer.bias))
        if mode != "bnb.int8":  # bitsandbytes' own dequantization
            own = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            torch.testing.assert_close(weight, own, atol=0, rtol=0)


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_gradient_through_quantized_layers_equals_gradient_through_their_dequantized_weights(float_model, mode):
    """What LoRA needs: the frozen quantized base passes the gradient on to whatever trains before it."""
    model = quantized(float_model, mode).train()
    reference = copy.deepcopy(float_model).train()
    with torch.no_grad():
        for name, layer in bnb_layers(model).items():
            reference.get_submodule(name).weight.copy_(dequantize_weight(layer))
    grads = []
    for m in (model, reference):
        m.requires_grad_(False)
        m.embed_tokens.weight.requires_grad_(True)  # stands in for a LoRA adapter below the quantized layers
        m(input_ids()).logsumexp(dim=-1).mean().backward()
        grads.append(m.embed_tokens.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for layer in bnb_layers(model).values() for p in layer.parameters())


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_training_forward_after_an_eval_forward_still_has_gradients(float_model, mode):
    """bitsandbytes repacks a 4-bit weight on an eval forward without grad on AVX512-BF16 CPUs, into a
    layout whose kernel has no backward; a validation pass in the middle of fine-tuning must not break it."""
    model = quantized(float_model, mode).requires_grad_(False)
    with torch.no_grad():
        before = model.eval()(input_ids())
    model.embed_tokens.weight.requires_grad_(True)
    model.train()(input_ids()).sum().backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids()), before)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_bfloat16_model_trains_through_quantized_layers(float_model, mode):
    model = quantize_model(copy.deepcopy(float_model).to(torch.bfloat16), mode).train().requires_grad_(False)
    model.embed_tokens.weight.requires_grad_(True)
    logits = model(input_ids())
    logits.logsumexp(dim=-1).mean().backward()
    assert torch.isfinite(logits).all() and model.embed_tokens.weight.grad.abs().sum() > 0
    layer = model.layers[0].mlp.down_proj
    assert dequantize_weight(layer).dtype == (torch.bfloat16 if mode == "bnb.nf4" else torch.float32)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_each_float_weight_is_freed_before_the_next_layer_is_quantized(float_model, mode, monkeypatch):
    """Peak memory is the quantized model plus one float layer, not the float model."""
    float_weights, alive_at_each_layer = [], []
    quantize_one = litllm.quantize._quantized_linear

    def spy(bnb, linear, *args):
        alive_at_each_layer.append(sum(ref() is not None for ref in float_weights))
        float_weights.append(weakref.ref(linear.weight))
        return quantize_one(bnb, linear, *args)

    monkeypatch.setattr(litllm.quantize, "_quantized_linear", spy)
    quantize_model(copy.deepcopy(float_model), mode)
    assert alive_at_each_layer == [0] * 7 * TINY.n_layers
    assert all(ref() is None for ref in float_weights)


def test_skip_keeps_the_named_layers_in_float(float_model):
    model = quantize_model(copy.deepcopy(float_model), "bnb.nf4", skip=("lm_head", "down_proj"))
    assert plain_linear(model.layers[0].mlp.down_proj) and plain_linear(model.lm_head)
    assert isinstance(model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert dequantize_weight(model.lm_head) is model.lm_head.weight


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_cpu_4bit_rows_not_a_multiple_of_64_are_a_user_error_not_wrong_weights(mode):
    """bitsandbytes 0.50's CPU kernel dequantizes such rows wrongly (relative weight error ~0.27, not ~0.1)."""
    model = GPT(Config(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=1, n_heads=4, n_kv_heads=2))
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.down_proj has 96"):
        quantize_model(model, mode)
    assert plain_linear(model.layers[0].attn.q_proj)  # checked before anything was replaced
    quantize_model(model, "bnb.int8")  # row-wise int8 has no blocks: any size works


def test_unknown_mode_is_a_user_error_listing_the_valid_ones(float_model):
    with pytest.raises(UserError, match="bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8"):
        quantize_model(copy.deepcopy(float_model), "bnb.nf3")


def test_missing_bitsandbytes_is_a_user_error_with_the_pip_command(float_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(UserError, match="pip install 'bitsandbytes"):
        quantize_model(copy.deepcopy(float_model), "bnb.nf4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_cpu_weights_quantized_onto_the_gpu_train_there(float_model, mode):
    model = quantize_model(copy.deepcopy(float_model), mode, device="cuda").train().requires_grad_(False)
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    model.embed_tokens.weight.requires_grad_(True)
    logits = model(input_ids().cuda())
    logits.logsumexp(dim=-1).mean().backward()
    with torch.no_grad():
        expected = float_model(input_ids())
    relative_error = (logits.detach().cpu() - expected).pow(2).mean().sqrt() / expected.std()
    assert relative_error < (0.03 if mode == "bnb.int8" else 0.25)
    assert model.embed_tokens.weight.grad.abs().sum() > 0

"""The model against transformers' own implementation of each family: same weights, same logits."""
import json
import re

import pytest
import torch

from hf_models import FAMILIES, save_tiny_hf_model
from litllm.checkpoint import litllm_to_hf, load_model, save_checkpoint
from litllm.config import Config
from litllm.errors import UserError


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_hf_model(request.param, out_dir)
    return request.param, out_dir, reference


def input_ids(batch=2, length=40, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(family):
    _, out_dir, reference = family
    x = input_ids()  # 40 tokens: longer than the Mistral sliding window (5) and the rope scaling's old context
    expected = reference(x).logits
    actual = load_model(out_dir)(x)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_older_rope_layout_reads_the_same(family, tmp_path):
    """Hub checkpoints carry `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`."""
    _, out_dir, reference = family
    hf = json.loads((out_dir / "config.json").read_text())
    params = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = None if params["rope_type"] == "default" else params
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors").symlink_to(out_dir / "model.safetensors")
    x = input_ids()
    torch.testing.assert_close(load_model(tmp_path)(x), reference(x).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(family):
    _, out_dir, _ = family
    model = load_model(out_dir)
    x = input_ids(batch=1, length=24)
    full = model(x)
    model.setup_kv_cache(batch_size=1, max_seq_len=32)
    prefill = 10
    steps = [model(x[:, :prefill], torch.arange(prefill))]
    for t in range(prefill, x.size(1)):  # one token at a time, past the sliding window
        steps.append(model(x[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_fused_projections_equal_transformers_in_a_full_pass_and_decoding(family):
    """fuse_projections (inference: one product for q/k/v, one for gate/up) against transformers, in a full pass and
    token by token through the KV cache; layers with LoRA adapters stay separate."""
    from litllm.lora import LoRAConfig, apply_lora
    from litllm.model import fuse_projections

    _, out_dir, reference = family
    model = load_model(out_dir)
    fuse_projections(model)
    assert not hasattr(model.layers[0].attn, "q_proj") and not hasattr(model.layers[0].mlp, "up_proj")
    x = input_ids(batch=1, length=24)
    expected = reference(x).logits
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    model.setup_kv_cache(batch_size=1, max_seq_len=32)
    steps = [model(x[:, :10], torch.arange(10))] + [model(x[:, t:t + 1], torch.tensor([t])) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)

    adapted = load_model(out_dir)
    apply_lora(adapted, LoRAConfig(targets=["k_proj"]))
    fuse_projections(adapted)
    assert adapted.layers[0].attn.qkv_proj is None and adapted.layers[0].mlp.gate_up_proj is not None


@torch.no_grad()
def test_branched_row_equals_each_sequence_alone(family):
    """One row holding a 20-token trunk and two branches (forking after 8 and 15 tokens, 12 and 6 tokens long), each
    token attending to the tokens of its own sequence only, as `attention_mask` says: every sequence's logits are
    those it gets alone, past the Mistral sliding window (5) too."""
    _, out_dir, _ = family
    model = load_model(out_dir)
    x = input_ids(batch=1, length=38)[0]
    trunk, forks, rests = x[:20], [8, 15], [x[20:32], x[32:38]]
    row = torch.cat([trunk, *rests])
    positions = torch.cat([torch.arange(20)] + [torch.arange(fork, fork + len(rest)) for fork, rest in zip(forks,
                                                                                                             rests)])
    # each sequence as row indices: the trunk's first `fork` tokens, then its own
    sequences = [list(range(20)), list(range(8)) + list(range(20, 32)), list(range(15)) + list(range(32, 38))]
    mask = torch.zeros(len(row), len(row), dtype=torch.bool)
    for sequence in sequences:
        for i, index in enumerate(sequence):
            mask[index, sequence[:i + 1]] = True
    logits = model(row[None], position_ids=positions[None], attention_mask=mask[None])[0]
    for sequence in sequences:
        torch.testing.assert_close(logits[sequence], model(row[sequence][None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_shard_size", [10**9, 200_000])  # one file, and shards with an index
@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers_with_same_logits(family, tmp_path, max_shard_size):
    from transformers import AutoModelForCausalLM

    _, out_dir, _ = family
    model = load_model(out_dir)
    saved = save_checkpoint(model, tmp_path / "saved", max_shard_size=max_shard_size)
    assert (saved / "model.safetensors.index.json").exists() == (max_shard_size < 10**6)
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    x = input_ids()
    torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(load_model(saved)(x), model(x), atol=0, rtol=0)


def test_unknown_model_type_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        Config.from_hf(tmp_path)


def test_unsupported_rope_type_is_a_user_error():
    hf = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(UserError, match="rope type 'longrope' is not supported"):
        Config.from_hf(hf)


@pytest.mark.parametrize("name", ["llama-tiny", "smollm2-135m", "llama-3.2-1b"])
def test_named_configs_build_the_same_parameters_as_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from litllm.model import GPT

    config = Config.from_name(name)
    hf = config.to_hf()
    with torch.device("meta"):
        ours = GPT(config)
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    shapes = lambda model: sorted(tuple(p.shape) for p in model.parameters())  # noqa: E731
    assert shapes(ours) == shapes(reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_equal_autograd_of_the_plain_expression(dtype):
    from litllm.model import swiglu

    torch.manual_seed(0)
    gate, up, grad = (torch.randn(3, 5, 64, dtype=dtype) for _ in range(3))
    results = []
    for fn in (swiglu, lambda g, u: torch.nn.functional.silu(g) * u):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(g, u)
        out.backward(grad)
        results.append((out, g.grad, u.grad))
    for fused, plain in zip(*results):
        assert torch.equal(fused, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_equals_transformers_bit_for_bit_with_gradients(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from litllm.rope import RotaryEmbedding, apply_rope

    config = Config(n_layers=1, hidden_size=64, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=32)
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=config.rope_theta)
    torch.manual_seed(0)
    q, k = (torch.randn(2, n, 7, config.head_dim, dtype=dtype, requires_grad=True) for n in (4, 2))
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    ours = apply_rope(q, *RotaryEmbedding(config)(torch.arange(7), dtype)), apply_rope(k, *RotaryEmbedding(config)(
        torch.arange(7), dtype))
    theirs = apply_rotary_pos_emb(q, k, *LlamaRotaryEmbedding(hf_config)(q, torch.arange(7).unsqueeze(0)))
    grads = [torch.autograd.grad(out, (q, k), (grad_q, grad_k)) for out in (ours, theirs)]
    for a, b in zip((*ours, *grads[0]), (*theirs, *grads[1])):
        assert torch.equal(a, b)


def test_under_autocast_each_norm_output_is_cast_once_with_transformers_logits_and_as_exact_gradients(tmp_path):
    """Under bf16 autocast q, k, v (and gate, up) take one bfloat16 tensor, cast once (transformers casts it in each
    layer): the logits are transformers' bit for bit, and every weight's gradient is as far from the float32 one as
    transformers', but for one bfloat16 rounding (their gradients for the norm's output add up in float32, ours in
    bfloat16)."""
    reference = save_tiny_hf_model("llama", tmp_path)
    model = load_model(tmp_path)
    block, seen = model.layers[0], {}
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        layer = getattr(block.attn, name, None) or getattr(block.mlp, name)
        layer.register_forward_pre_hook(lambda module, args, name=name: seen.update({name: args[0]}))
    x = input_ids()

    def logits_and_grads(module, autocast, logits):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = logits(module(x))
        out.float().square().mean().backward()
        return out, {name: p.grad for name, p in module.named_parameters()}

    ours, our_grads = logits_and_grads(model, True, lambda out: out)
    theirs, their_grads = logits_and_grads(reference, True, lambda out: out.logits)
    _, exact = logits_and_grads(reference, False, lambda out: out.logits)
    assert {t.dtype for t in seen.values()} == {torch.bfloat16}
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"] and seen["gate_proj"] is seen["up_proj"]
    assert torch.equal(ours.float(), theirs.float())
    assert {litllm_to_hf(name) for name in our_grads} == set(their_grads)
    for name, hf in ((name, litllm_to_hf(name)) for name in our_grads):
        ours_off = (our_grads[name] - exact[hf]).norm()
        theirs_off = (their_grads[hf] - exact[hf]).norm()
        # bfloat16 sums of a few terms: at most one bfloat16 rounding (2^-8 of the gradient) further off
        assert 0 < theirs_off and ours_off <= theirs_off + 2**-8 * exact[hf].norm(), (name, ours_off, theirs_off)



@pytest.mark.parametrize("autocast", [False, True], ids=["bfloat16", "bf16-autocast"])
def test_bfloat16_causal_attention_is_sdpas_output_with_a_backward_nearer_to_exact(autocast):
    """causal_attention in bfloat16 with gradients (bfloat16 inputs, or float32 ones under autocast): SDPA's output bit
    for bit, and gradients (float32 backward) nearer to float64's from the same inputs than SDPA's bfloat16 backward,
    within one bfloat16 rounding of them."""
    import torch.nn.functional as F

    from litllm.model import causal_attention

    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    q, k, v = (torch.randn(shape, generator=generator).bfloat16().to(dtype).requires_grad_()
               for shape in [(1, 6, 128, 64), (1, 2, 128, 64), (1, 2, 128, 64)])  # grouped-query: 3 q heads per k
    grad = torch.randn(1, 6, 128, 64, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = causal_attention(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert ours.grad_fn.name() == "BFloat16CausalAttentionBackward" and torch.equal(ours, theirs)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*exact_inputs, is_causal=True, enable_gqa=True)
    for our_grad, their_grad, exact_grad in zip(torch.autograd.grad(ours, (q, k, v), grad),
                                                torch.autograd.grad(theirs, (q, k, v), grad),
                                                torch.autograd.grad(exact, exact_inputs, grad.double())):
        ours_off, theirs_off = ((g.double() - exact_grad).norm() / exact_grad.norm() for g in (our_grad, their_grad))
        assert ours_off < min(theirs_off, 2**-8), (ours_off, theirs_off)


def float32_error_bound(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """The worst-case error of a float32 a @ b (+ add), elementwise, whatever the order of the sums: gamma_n (|a| @ |b|
    + |add|) for n = K + 2 roundings (the K terms, the addend, the output's own); gamma_n = n u / (1 - n u),
    u = 2^-24."""
    n, u = a.size(-1) + 2, 2.0 ** -24
    bound = a.double().abs() @ b.double().abs()
    return n * u / (1 - n * u) * (bound if add is None else bound + add.double().abs())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("trains", [True, False], ids=["trained", "frozen"])
def test_onednn_linear_is_the_exact_product_within_float32_rounding(bias, trains):
    """OneDNNLinear, and PyTorch's F.linear beside it, against float64 F.linear of the same values: the output and
    each gradient within the worst-case rounding of a float32 sum in any order. The two float32 kernels sum in other
    orders, so they do not agree to the bit; a wrong operand, or a dropped bias or gradient, misses the bound by
    orders of magnitude."""
    from litllm.model import Linear, OneDNNLinear, onednn_float32

    torch.manual_seed(0)
    layer = Linear(576, 1536, bias=bias).requires_grad_(trains)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    x, grad = torch.randn(3, 100, 576), torch.randn(3, 100, 1536)
    x64, params64 = x.double().requires_grad_(), [p.detach().double().requires_grad_(trains) for p in params]
    exact = torch.nn.functional.linear(x64, *params64)
    exact = [exact, *torch.autograd.grad(exact, [x64, *params64[:2 * trains]], grad.double())]
    rows_x, rows_grad = x.view(-1, 576), grad.view(-1, 1536)
    bounds = [float32_error_bound(x, layer.weight.T, layer.bias), float32_error_bound(grad, layer.weight),
              float32_error_bound(rows_grad.T, rows_x), float32_error_bound(rows_grad.T, torch.ones(300, 1))[:, 0]]
    for product in (OneDNNLinear.apply, torch.nn.functional.linear):
        x32 = x.clone().requires_grad_()
        out = product(x32, layer.weight, layer.bias)
        ours = [out, *torch.autograd.grad(out, [x32, *params[:2 * trains]], grad)]
        assert len(ours) == len(exact) == 2 + trains * len(params)
        for value, exact_value, bound in zip(ours, exact, bounds, strict=False):
            assert value.dtype == torch.float32 and value.shape == exact_value.shape
            assert ((value.double() - exact_value).abs() <= bound).all()

    def kernel(rows: int) -> bool:  # whether Linear multiplies `rows` rows by oneDNN
        return type(layer(torch.randn(rows, 576, requires_grad=True)).grad_fn).__name__ == "OneDNNLinearBackward"

    assert kernel(300) == onednn_float32() and not kernel(1)  # 1 row: too small a product to gain


def test_a_compiled_one_row_product_is_inductors_own_loop_within_float32_rounding():
    """model.linear under torch.compile on CPU: a product of one row (a decode step's) is torch.mv, which inductor
    compiles into a loop of its own, with no call to PyTorch's matrix kernels (extern_kernels.mm or addmm in the
    generated code);
    more rows stay F.linear's. Its sums are float32's, rounded once to the dtype: within float32's bound of the exact
    product, and bfloat16's rounding of it."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from litllm.model import linear

    torch.manual_seed(0)
    for dtype, rows in ((torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 3)):
        weight, bias, x = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype), torch.randn(1, rows, 64).to(dtype)
        with fresh_cache():  # compiled here, not read from an earlier run's cache
            out, code = run_and_get_code(torch.compile(lambda x: linear(x, weight, bias)), x)
        calls = re.findall(r"extern_kernels\.(\w+)\(", "".join(code))
        assert calls == ([] if rows == 1 else ["addmm"]) and out.dtype == dtype and out.shape == (1, rows, 96)
        exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
        rounding = 0 if dtype == torch.float32 else 2**-8
        bound = float32_error_bound(x, weight.T, bias) * (1 + rounding) + exact.abs() * rounding
        assert ((out.double() - exact).abs() <= bound).all()

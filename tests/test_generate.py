"""Decoding on the real SmolLM2 checkpoint against transformers' `generate`."""
import contextlib
import gc
import json
import mmap
import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import litllm.decode
from litllm import LLM
from litllm.checkpoint import load_model
from litllm.decode import (HalfLinear, PackedLinear, RowBlockLinear, generate_tokens, inference_linears, prefill,
                           sample_continuations)
from litllm.lora import LoRAConfig, apply_lora
from litllm.memory import weights_on_huge_pages
from litllm.model import plain_linear
from litllm.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam"},
     {"role": "user", "content": "Now one about mountains."}],
    [{"role": "user", "content": "안녕하세요! 자기소개를 해 주세요."}],
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    with pytest.MonkeyPatch.context() as patch:  # row blocks on any CPU, as off Intel's (see RowBlockLinear)
        patch.setattr(litllm.decode, "cpu_vendor", lambda: "AuthenticAMD")
        return LLM.load(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@contextmanager
def threads(count: int):
    """torch's thread count set to `count` for a while (the suite runs each worker with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("messages", CHATS)
def test_greedy_generation_equals_transformers(llm, hf_model, messages):
    prompt_ids = llm.tokenizer.encode_chat(messages)
    with threads(2):  # LLM.load's one-row products then run in two row blocks (RowBlockLinear)
        ours = list(generate_tokens(llm.model, prompt_ids, max_new_tokens=40, stop_ids=llm.tokenizer.stop_ids))
    expected = hf_model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=40, do_sample=False, eos_token_id=llm.tokenizer.stop_ids,
        pad_token_id=llm.tokenizer.pad_id,
    )[0, len(prompt_ids):].tolist()
    assert ours == expected
    assert len(ours) >= 32 or ours[-1] in llm.tokenizer.stop_ids


def test_llm_api_generate_chat_and_logits(llm, hf_model):
    answer = llm.chat(CHATS[0], max_new_tokens=24)
    assert "Paris" in answer
    ids = llm.tokenizer.encode("The quick brown fox")
    logits = llm.model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), llm.model.config.vocab_size) and logits.dtype == torch.float32
    reference = hf_model(torch.tensor([ids])).logits
    # LLM.load's linear layers compute one row in row blocks (RowBlockLinear): other matmul kernels, another
    # summation order, so it is compared with the float64 truth, against which it must be as accurate as
    # transformers' float32
    exact = hf_model.to(torch.float64)(torch.tensor([ids])).logits
    hf_model.to(torch.float32)
    assert (logits - exact).abs().max() <= 1.5 * (reference - exact).abs().max()
    # in the usual layout, litllm computes what transformers does
    torch.testing.assert_close(load_model(llm.checkpoint_dir)(torch.tensor([ids])), reference, atol=1e-4, rtol=0)
    completion = llm.generate("The capital of Germany is", max_new_tokens=8)
    assert completion == "".join(llm.generate("The capital of Germany is", max_new_tokens=8, stream=True))


def test_inference_linears_compute_a_few_float32_rows_in_blocks_and_keep_the_parameters(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(33, 64), "proj": nn.Linear(64, 96), "head": nn.Linear(64, 33, False)})
    for param in model.parameters():
        nn.init.normal_(param, generator=generator)
    model.head.weight = model.embed.weight  # tied, as a tied lm_head
    inputs = [torch.randn(shape, generator=generator) for shape in [(1, 1, 64), (2, 5, 64), (1, 257, 64)]]
    expected = {name: [model[name](x) for x in inputs] for name in ("proj", "head")}
    monkeypatch.setattr(litllm.decode, "cpu_vendor", lambda: "GenuineIntel")  # MKL's own one-row product is faster
    assert inference_linears(model) == []
    monkeypatch.setattr(litllm.decode, "cpu_vendor", lambda: "AuthenticAMD")
    inference_linears(model)
    assert type(model.proj) is RowBlockLinear and model.head.weight is model.embed.weight
    bmm_calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: bmm_calls.append(args[1].shape) or bmm(*args))
    # 1 and 10 rows in blocks, 257 (more than max_rows) plain. 2 threads: proj's 96 weight rows in 2 blocks of 48, head's
    # 33 do not split in 2 (plain); 3 threads: 3 x 32 and 3 x 11
    for count, blocks in ((2, [(2, 64, 48)] * 2), (3, [(3, 64, 32)] * 2 + [(3, 64, 11)] * 2)):
        bmm_calls.clear()
        with threads(count):
            for name, outputs in expected.items():
                for x, output in zip(inputs, outputs):
                    torch.testing.assert_close(model[name](x), output)
        assert bmm_calls == blocks and RowBlockLinear.max_rows == 256
    # a product model.linear gives to oneDNN is not split in blocks: here from 64 x 96 x 5 multiply-adds, so proj's 10
    # and 257 rows go to oneDNN and only its 1 row to row blocks (head's 33 rows never split in 2)
    monkeypatch.setattr(litllm.model, "onednn_float32", lambda: True)
    monkeypatch.setattr(litllm.model, "ONEDNN_MIN_PRODUCT", 64 * 96 * 5)
    onednn_calls = []
    onednn = litllm.model.OneDNNLinear.apply
    monkeypatch.setattr(litllm.model.OneDNNLinear, "apply",
                        lambda *args: onednn_calls.append(args[0].shape) or onednn(*args))
    bmm_calls.clear()
    with threads(2):
        for x, output in zip(inputs, expected["proj"]):
            torch.testing.assert_close(model.proj(x), output)
    assert bmm_calls == [(2, 64, 48)] and onednn_calls == [(2, 5, 64), (1, 257, 64)]


def advised_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether the memory map that holds `tensor` is advised for transparent huge pages (VmFlags "hg" in
    /proc/self/smaps: the advice, whatever the kernel's THP setting makes of it)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                start, end = (int(bound, 16) for bound in line.split(" ", 1)[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()
    return False


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages on this platform")
def test_an_inference_models_weights_move_to_huge_pages_as_they_were(tiny_chat_model_dir):
    """weights_on_huge_pages: the same parameters with the same values, strides (a column-major weight too) and ties,
    in a map advised for huge pages that outlives the call; LLM.load's are there."""
    model = load_model(tiny_chat_model_dir)
    layer = model.layers[0].mlp.down_proj
    layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t(), requires_grad=False)
    params = dict(model.named_parameters())
    before = {name: (param.detach().clone(), param.stride()) for name, param in params.items()}
    tokens = torch.tensor([[1, 2, 3, 4]])
    expected = model(tokens)
    assert not any(advised_huge_pages(param) for param in params.values())
    assert weights_on_huge_pages(model) >= sum(param.nbytes for param in params.values())
    gc.collect()  # nothing but the parameters holds the map now
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.lm_head.weight is model.embed_tokens.weight
    for name, param in params.items():
        assert torch.equal(param, before[name][0]) and param.stride() == before[name][1] and advised_huge_pages(param)
    assert torch.equal(model(tokens), expected)
    llm = LLM.load(tiny_chat_model_dir)
    assert all(advised_huge_pages(param) for param in llm.model.parameters())


def test_sampling_from_a_lora_model_runs_in_row_blocks_and_gives_the_layers_back(tiny_chat_model_dir, monkeypatch):
    """GRPO samples from the model it trains: meanwhile its layers (LoRA's base and adapter layers too) compute in row
    blocks, and afterwards they are plain nn.Linear again, for training's products and torch.compile."""
    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_chat_model_dir), LoRAConfig(r=4, dropout=0.0)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # adapters that change the answers
    prompt = Tokenizer(tiny_chat_model_dir).encode_chat([{"role": "user", "content": "Say something."}])
    greedy = list(generate_tokens(model, prompt, 6))  # plain layers
    monkeypatch.setattr(litllm.decode, "cpu_vendor", lambda: "AuthenticAMD")  # row blocks (not on Intel CPUs)
    bmm_calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: bmm_calls.append(args[1].shape) or bmm(*args))
    with threads(2):
        assert sample_continuations(model, prompt, 3, 6, temperature=0.0) == [greedy] * 3
    assert (2, 64, 32) in bmm_calls  # e.g. q_proj's base layer: 64 weight rows in 2 blocks
    assert all(plain_linear(module) for module in model.modules() if isinstance(module, nn.Linear))


def test_half_linears_multiply_many_rows_in_float32_on_a_cpu_without_fast_half_products(monkeypatch):
    import litllm.checkpoint

    generator = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"fp16": nn.Linear(64, 96).half(), "bf16": nn.Linear(64, 96, bias=False).bfloat16(),
                           "fp32": nn.Linear(64, 96)})
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 1.5)  # a CPU with fast kernels
    monkeypatch.setattr(litllm.decode, "cpu_vendor", lambda: "AuthenticAMD")  # float32 in row blocks
    assert [type(layer) for layer in inference_linears(model, pack=False)] == [RowBlockLinear]
    model.fp32.__class__ = nn.Linear
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 60.0)  # as on a 2-core AVX2 EPYC
    assert [type(layer) for layer in inference_linears(model)] == [HalfLinear, HalfLinear, RowBlockLinear]
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *args: calls.append(x.dtype) or linear(x, *args))
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        layer = model[name]
        for rows in (1, 8, 9, 43):
            x = torch.randn(rows, 64, generator=generator).to(dtype)
            calls.clear()
            y = layer(x)
            # a decode step's rows keep the half product; a prompt's are multiplied in float32, rounded once
            assert calls == [dtype if rows <= HalfLinear.max_rows else torch.float32] and y.dtype == dtype
            if rows > HalfLinear.max_rows:
                bias = None if layer.bias is None else layer.bias.float()
                assert torch.equal(y, linear(x.float(), layer.weight.float(), bias).to(dtype))
            torch.testing.assert_close(y, linear(x, layer.weight, layer.bias))  # the half product, to its rounding


PACKS_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # where bfloat16 products are fast, prepacked weights
PACKS = {torch.bfloat16: PACKS_BF16, torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_prepacked_half_precision_layers_equal_the_plain_product(dtype, tiny_chat_model_dir, monkeypatch):
    """On a CPU with fast bfloat16 (float16) products, inference keeps such weights in oneDNN's layout. bfloat16: the
    same kernel as F.linear's, so logits and tokens are the plain model's to the bit, compiled too. float16: another
    kernel than PyTorch's, so each output is held to the exact product (float64's) within float32's error bound and
    the final rounding, as F.linear's own is. Either way a tied weight stays the embeddings' too, and LoRA layers, a
    model that trains (pack=False), keep their plain weights."""
    import litllm.checkpoint
    from test_model import float32_error_bound

    if not PACKS[dtype]:
        pytest.skip(f"this CPU has no oneDNN {dtype} products")
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 0.4)  # half products as fast as here
    generator = torch.Generator().manual_seed(0)
    layers = nn.ModuleDict({"embed": nn.Embedding(33, 64), "proj": nn.Linear(64, 96), "head": nn.Linear(64, 33, False)})
    for param in layers.parameters():
        nn.init.normal_(param, generator=generator)
    layers.head.weight = layers.embed.weight
    layers.to(dtype)
    weights = {name: (layers[name].weight.clone(), layers[name].bias) for name in ("proj", "head")}
    inputs = [torch.randn(shape, generator=generator).to(dtype) for shape in [(1, 1, 64), (2, 5, 64), (300, 64)]]
    expected = {name: [layers[name](x) for x in inputs] for name in ("proj", "head")}
    assert [type(layer) for layer in inference_linears(layers)] == [PackedLinear, PackedLinear]
    assert layers.proj.weight.is_mkldnn and layers.head.weight is layers.embed.weight  # one copy; tied stays tied
    for name, outputs in expected.items():
        weight, bias = weights[name]
        for x, output in zip(inputs, outputs):
            if dtype == torch.bfloat16:
                assert torch.equal(layers[name](x), output)
                continue
            exact = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
            bound = float32_error_bound(x, weight.T, bias) * (1 + 2**-11) + exact.abs() * 2**-11 + 2**-25
            assert ((output.double() - exact).abs() <= bound).all()  # F.linear's own, as the bound means it
            assert ((layers[name](x).double() - exact).abs() <= bound).all()
    with torch.inference_mode():  # --compile true decodes through the same product, an op of its own there
        assert torch.equal(torch.compile(layers.proj)(inputs[1]), layers.proj(inputs[1]))

    plain = load_model(tiny_chat_model_dir, dtype=dtype)
    packed = load_model(tiny_chat_model_dir, dtype=dtype)
    inference_linears(packed)
    assert type(packed.layers[0].attn.q_proj) is PackedLinear
    prompt = Tokenizer(tiny_chat_model_dir).encode_chat(CHATS[0])
    if dtype == torch.bfloat16:
        assert torch.equal(packed(torch.tensor([prompt])), plain(torch.tensor([prompt])))
        assert list(generate_tokens(packed, prompt, 8)) == list(generate_tokens(plain, prompt, 8))

    lora = apply_lora(load_model(tiny_chat_model_dir, dtype=dtype), LoRAConfig(r=4))
    assert inference_linears(lora) == [lora.lm_head] and inference_linears(plain, pack=False) == []
    assert all(plain_linear(module) for name, module in lora.named_modules()
               if isinstance(module, nn.Linear) and name != "lm_head")


def test_a_single_stream_decodes_bfloat16_steps_with_pytorchs_kernel_and_a_batched_llm_packs(tiny_chat_model_dir,
                                                                                            monkeypatch):
    """Where one_row_kernel holds (bfloat16 on an AMD CPU with fast bfloat16 products), LLM keeps plain weights and
    runs each one-token step with oneDNN off, the prompt with it on; a batched LLM (the server's) packs its weights.
    oneDNN is on again after every step, one that fails too. The one-row kernel's products are the exact ones
    (float64's) within float32's error bound and bfloat16's final rounding."""
    import litllm.checkpoint
    from test_model import float32_error_bound

    if not PACKS_BF16:
        pytest.skip("this CPU has no oneDNN bfloat16 products")
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 1.5)  # fast bfloat16 products
    monkeypatch.setattr(litllm.decode, "cpu_vendor", lambda: "AuthenticAMD")
    single, batched = LLM.load(tiny_chat_model_dir, dtype="bf16"), LLM.load(tiny_chat_model_dir, dtype="bf16",
                                                                            batched=True)
    linears = [module for module in single.model.modules() if isinstance(module, nn.Linear)]
    assert all(plain_linear(layer) for layer in linears)
    assert all(type(layer) is PackedLinear for layer in batched.model.modules() if isinstance(layer, nn.Linear))

    calls = []  # oneDNN's switch in the prompt's forward (the model's) and in each one-token step (OneTokenStep)
    down_proj = single.model.layers[0].mlp.down_proj
    down_proj.register_forward_pre_hook(lambda _, args: calls.append((args[0].shape[1], torch.backends.mkldnn.enabled)))
    step = litllm.decode.OneTokenStep.__call__
    monkeypatch.setattr(litllm.decode.OneTokenStep, "__call__",
                        lambda *args: calls.append((1, torch.backends.mkldnn.enabled)) or step(*args))
    prompt = single.tokenizer.encode_chat(CHATS[0])
    assert len(list(generate_tokens(single.model, prompt, 4, decode_step=single.decode_step))) == 4
    assert calls == [(len(prompt), True)] + [(1, False)] * 3 and torch.backends.mkldnn.enabled

    def fails(*args):
        assert not torch.backends.mkldnn.enabled
        raise RuntimeError("a failing step")

    with pytest.raises(RuntimeError, match="a failing step"):
        litllm.decode.one_row_steps(fails)()
    assert torch.backends.mkldnn.enabled

    generator = torch.Generator().manual_seed(0)
    for layer in linears:
        x = torch.randn(1, 1, layer.in_features, generator=generator).to(torch.bfloat16)
        with litllm.decode.onednn_off(), torch.inference_mode():
            output = layer(x).double()
        bias = None if layer.bias is None else layer.bias.double()
        exact = torch.nn.functional.linear(x.double(), layer.weight.double(), bias)
        bound = float32_error_bound(x, layer.weight.T, layer.bias) * (1 + 2**-8) + exact.abs() * 2**-8 + 2**-133
        assert ((output - exact).abs() <= bound).all()


def test_compiled_decoding_equals_eager_as_the_kv_cache_length_changes(tiny_chat_model_dir):
    """--compile true: one graph for every KV cache length (a dynamic dimension; compiled_step), whose steps equal
    eager's at each length. A longer prompt, whose cache is longer, compiles nothing new: each length compiled a graph
    of its own before, ~45 s on a 2-core CPU, and fails the count below."""
    from torch._dynamo.utils import counters

    compiled, eager = LLM.load(tiny_chat_model_dir, compile=True), LLM.load(tiny_chat_model_dir)
    short = compiled.tokenizer.encode("The capital of France is")
    long = compiled.tokenizer.encode(" ".join(["a tale of two cities"] * 60))
    assert len(short) + 8 <= 256 < len(long) + 8  # KV caches of 256 and 512 positions
    graphs = []
    for prompt in (short, long, short):
        ours = list(generate_tokens(compiled.model, prompt, 8, decode_step=compiled.decode_step))
        assert ours == list(generate_tokens(eager.model, prompt, 8)) and len(ours) == 8
        graphs.append(counters["stats"]["unique_graphs"])  # graphs compiled so far in this process
    assert graphs[0] == graphs[1] == graphs[2]


def test_compiled_decoding_past_a_sliding_window_is_one_graph_equal_to_eager(smollm2_dir, tmp_path):
    """--compile true reads each step's position in the graph (GPT.forward's kv_len) and attends to the positions
    reached. Past a sliding window (Mistral's, 5 positions here) the step keeps the window's mask; the comparison of
    the position with the window must not break the graph (a graph per layer) nor compile a graph per position."""
    from hf_models import save_tiny_hf_model
    from torch._dynamo.utils import counters

    from litllm.checkpoint import copy_tokenizer_files

    save_tiny_hf_model("mistral-sliding", tmp_path)
    copy_tokenizer_files(smollm2_dir, tmp_path)
    compiled, eager = LLM.load(tmp_path, compile=True), LLM.load(tmp_path)
    assert compiled.model.config.sliding_window < 8
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    for prompt in ([1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12]):
        ours = list(generate_tokens(compiled.model, prompt, 8, decode_step=compiled.decode_step))
        assert ours == list(generate_tokens(eager.model, prompt, 8)) and len(ours) == 8
    assert sum(counters["graph_break"].values()) == breaks and counters["stats"]["unique_graphs"] == graphs + 1


def test_compiled_steps_of_models_in_one_process_are_each_their_own(tiny_chat_model_dir, tmp_path, monkeypatch):
    """compiled_step checks no guards on the model's config or weights. Two models that differ only in what those
    guards saw (rms_norm_eps here) each run graphs of their own, equal to their eager steps: a step's graphs are kept
    on a code object of its own (with one shared, the second model runs the first's graph, and this fails). The
    filter does drop the parameters' guards and keeps the KV cache's (guard names are Dynamo's, not ours).

    Nor do the steps share Dynamo's automatic dynamic shapes, kept by the code's file, line and name: a float16 model
    after float32 ones of other layouts had its weights' strides compiled as symbols, ~12% slower, and one of other
    sizes (a wider MLP here) would have its weights' shapes."""
    from hf_models import save_tiny_hf_model

    from litllm.checkpoint import copy_tokenizer_files

    kept = {}
    guard_filter = litllm.decode._no_guards_on_the_model_but_buffers
    monkeypatch.setattr(litllm.decode, "_no_guards_on_the_model_but_buffers", lambda guards: [
        kept.setdefault(guard.name, keep) for guard, keep in zip(guards, guard_filter(guards))])
    other = tmp_path / "other"
    shutil.copytree(tiny_chat_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    wider = tmp_path / "wider"
    save_tiny_hf_model("tied", wider, vocab_size=49152, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512)
    copy_tokenizer_files(tiny_chat_model_dir, wider)
    prompt = torch.tensor([[1, 2, 3, 4]])
    for directory, dtype in ((tiny_chat_model_dir, "float32"), (other, "float32"), (wider, "float16")):
        llm = LLM.load(directory, dtype=dtype, compile=True)
        with torch.inference_mode():
            llm.model.setup_kv_cache(batch_size=1, max_seq_len=256)
            prefill(llm.model, prompt, torch.arange(4))
            token, position = torch.tensor([[5]]), torch.tensor([4])
            ours, theirs = llm.decode_step(token, position), llm.model(token, position)
            # float16: the graph's kernels round other intermediates than eager's, a few ulps of the largest logit
            tolerance = {} if dtype == "float32" else {"rtol": 0, "atol": 2**-8 * float(theirs.abs().max())}
            torch.testing.assert_close(ours, theirs, **tolerance)
            llm.model.clear_kv_cache()
    steps = [state for code, state in torch._dynamo.pgo.get_code_state().items() if code.name == "step"]
    assert not any(entry.is_size_dynamic(dim) or entry.is_stride_dynamic(dim) for state in steps
                   for name, entry in state.automatic_dynamic.items() if "._parameters[" in name
                   for dim in range(len(entry.size)))
    assert not any(keep for name, keep in kept.items() if "._parameters['weight']" in name)
    assert all(keep for name, keep in kept.items() if "._modules['kv_cache']._buffers[" in name)
    assert sum(1 for name in kept if "._modules['kv_cache']._buffers[" in name) == 2 * len(llm.model.layers)  # k, v


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral-sliding", "tied"])
def test_the_one_token_step_gives_the_models_logits_to_the_bit(family, tmp_path):
    """OneTokenStep, eager CPU decoding's step (LLM), against the model's own forward, after a prompt's prefill, as
    LLM.load prepares the model (fused projections, inference layers) in each dtype: biases (Qwen2), per-head norms
    (Qwen3), a sliding window the cache outgrows (Mistral's, 5 positions: the model's forward from there), tied
    embeddings. Where one_row_kernel holds, bfloat16 steps run under onednn_off, as LLM runs them."""
    from hf_models import save_tiny_hf_model

    from litllm.decode import OneTokenStep, one_row_kernel, onednn_off, prefill
    from litllm.model import fuse_projections

    save_tiny_hf_model(family, tmp_path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_model(tmp_path, dtype=dtype)
        fuse_projections(model)
        one_row = one_row_kernel(dtype)
        inference_linears(model, pack=not one_row)
        step, logits = OneTokenStep(model), []
        for decode in (model, step):
            with torch.inference_mode():
                model.setup_kv_cache(batch_size=1, max_seq_len=16)
                prefill(model, torch.tensor([[5, 17, 33]]), torch.arange(3))
                for position in range(3, 10):
                    with onednn_off() if one_row else contextlib.nullcontext():
                        logits.append(decode(torch.tensor([[position * 7]]), torch.tensor([position])))
        assert len(logits) == 14 and all(torch.equal(a, b) for a, b in zip(logits[:7], logits[7:])), dtype


def test_greedy_float16_generation_equals_transformers(smollm2_dir):
    """In float16, whichever product LLM.load's layers take on this CPU (HalfLinear's where half products are slow:
    the prompt in float32, each decode step's row in float16; oneDNN's prepacked one where they are fast; PyTorch's
    otherwise), the tokens are transformers' float16 ones."""
    from transformers import AutoModelForCausalLM

    llm = LLM.load(smollm2_dir, dtype="float16")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float16).eval()
    prompt_ids = llm.tokenizer.encode_chat(CHATS[0])
    with threads(2):
        ours = list(generate_tokens(llm.model, prompt_ids, max_new_tokens=24, stop_ids=llm.tokenizer.stop_ids))
    expected = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, eos_token_id=llm.tokenizer.stop_ids,
                           pad_token_id=llm.tokenizer.pad_id)[0, len(prompt_ids):].tolist()
    assert ours == expected and len(ours) >= 8


def test_half_precision_training_on_a_cpu_without_fast_kernels_is_warned_about(tiny_chat_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    import litllm.checkpoint
    from litllm.training.fabric import setup_fabric

    assert litllm.checkpoint.cpu_matmul_slowdown(torch.float16) > 0  # measured on this machine: fast or not
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 60.0)  # as on a 2-core AVX2 EPYC
    llm = LLM.load(tiny_chat_model_dir, dtype="bf16")  # inference: its products are HalfLinear's, nothing to say
    assert type(llm.model.layers[0].mlp.down_proj) is HalfLinear
    LLM.load(tiny_chat_model_dir)
    setup_fabric(tmp_path, "bf16-true", "csv")
    assert capsys.readouterr().err.splitlines() == [
        "warning: bfloat16 matrix products run 60x slower than float32 on this CPU (measured just now); --precision "
        "32-true is faster here"]
    monkeypatch.setattr(litllm.checkpoint, "cpu_matmul_slowdown", lambda dtype: 1.5)  # a CPU with fast kernels
    llm = LLM.load(tiny_chat_model_dir, dtype="bf16", batched=True)
    assert type(llm.model.layers[0].mlp.down_proj) is (PackedLinear if PACKS_BF16 else nn.Linear)
    setup_fabric(tmp_path, "bf16-mixed", "csv")
    assert "warning" not in capsys.readouterr().err


def test_a_stall_in_the_first_products_is_not_read_as_a_slow_half_precision(monkeypatch):
    """A busy machine stalls a few of cpu_matmul_slowdown's microsecond products: only a slowdown that every try
    confirms counts (the verdict is the same as without the stalls, whether this CPU's bfloat16 is fast or slow)."""
    import time

    import litllm.checkpoint

    slowdown, product, stalls = litllm.checkpoint.cpu_matmul_slowdown, torch.Tensor.__matmul__, []

    def stalled(a, b):  # the first four bfloat16 products (kernel selection and three tries) each meet a 50 ms stall
        if a.dtype == torch.bfloat16 and len(stalls) < 4:
            stalls.append(time.sleep(0.05))
        return product(a, b)

    slowdown.cache_clear()
    try:
        calm = slowdown(torch.bfloat16)
        slowdown.cache_clear()
        monkeypatch.setattr(torch.Tensor, "__matmul__", stalled)
        assert (slowdown(torch.bfloat16) >= litllm.checkpoint.SLOW) == (calm >= litllm.checkpoint.SLOW)
        assert len(stalls) == 4
    finally:
        slowdown.cache_clear()

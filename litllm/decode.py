"""Decoding with a preallocated KV cache: greedy, temperature, top-k, top-p sampling; text streaming with stop strings.

Used by `litllm generate`/`chat` (through LLM), the server, evaluation and sampling during training.
"""
from __future__ import annotations

import functools
import re
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from litllm import checkpoint
from litllm.errors import UserError
from litllm.model import GPT, Linear, cpu_vendor, linear, onednn_product, plain_linear, takes_onednn
from litllm.rope import apply_rope


class RowBlockLinear(torch.nn.Linear):
    """nn.Linear whose products with a few rows (up to 256: a decode step, a short continuation) run as one product
    per thread, each over its own block of the weight's rows; more rows (a long prompt, a batch of documents to score)
    take model.linear's (oneDNN's where that is the faster kernel, else F.linear's). So does every product that
    model.linear gives to oneDNN (takes_onednn: AMD CPUs with AVX-512, from ONEDNN_MIN_PRODUCT multiply-adds), whose
    kernel threads over the output itself: on a 2-core AMD EPYC (Zen 4) it ran SmolLM2's block products from there
    as fast as row blocks or up to 1.35x faster, and its output layer (49152 x 576) 1.2-2.1x faster at 1-256 rows
    (evaluation's log-prob chunks: perplexity ~3% faster; benchmarks/RESULTS.md).

    A decode step is one matrix-vector product per weight, bound by how fast the weights stream from memory, and
    PyTorch's CPU product of one row streams them with one thread (measured on a 2-core AMD EPYC: 10 GB/s with one
    thread or two, where two threads summing memory reach 23 GB/s); with a few rows it threads poorly too. As a batch
    of products over row blocks (torch.bmm), each thread streams its own block: 1 row 1.7-1.8x, 8 rows 1.7x, 64 rows
    1.2x the plain product's speed there; at 1024 rows the two are even. Each output is the same dot product either
    way (in_features is not split), so the values equal F.linear's but for the kernels' summation order.

    Not on Intel CPUs, where MKL's product of one row streams with every thread itself, and faster than row blocks
    (2-core Intel Xeon, SmolLM2's decode shapes: 24-28 against 20-26 GB/s; greedy decoding 3-4% faster).
    """

    max_rows = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # its own kernels (see model.linear); get_num_threads would break the graph
            return linear(x, self.weight, self.bias)
        blocks, rows = torch.get_num_threads(), x.numel() // self.in_features
        if rows > self.max_rows or blocks == 1 or self.out_features % blocks or takes_onednn(x, self.weight):
            return linear(x, self.weight, self.bias)
        weight = self.weight.view(blocks, self.out_features // blocks, self.in_features)  # row blocks, no copy
        # (blocks, rows, out_features / blocks)
        y = torch.bmm(x.reshape(1, rows, -1).expand(blocks, rows, -1), weight.transpose(1, 2))
        y = y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class HalfLinear(torch.nn.Linear):
    """nn.Linear with bfloat16/float16 weights, for a CPU whose half-precision matrix products are slow (no AVX-512:
    PyTorch's 256 x 256 product runs 50-90x slower than in float32 on a 2-core AVX2 AMD EPYC).

    Up to `max_rows` rows (a decode step) keep PyTorch's half product, which is a matrix-vector kernel per row there
    and streams the 16-bit weights fast (13-19 GB/s, twice float32's parameters per second). More rows (a prompt's
    prefill, a batch of requests) compute in float32, the weight converted for the call: 43 rows 3x faster, 8 rows
    even. Either way the sums are float32's and the result is rounded to the weight's dtype once."""

    max_rows = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features <= self.max_rows:
            return linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose weight is kept in oneDNN's blocked layout for this CPU, reordered once: for bfloat16 weights on
    a CPU with fast bfloat16 products (AVX512-BF16), where PyTorch's product is oneDNN's too but reorders the weight
    on every call. On a 2-core AMD EPYC (Zen 4), SmolLM2's products of 1-8 rows (decode steps) 1.7-2.3x faster,
    43 rows (a prompt) 1.2-1.4x, 256 rows even; the same kernel, so the results are F.linear's to the bit. Likewise
    float16 weights on a CPU with AVX512-FP16, where PyTorch's own product is another kernel (sums in float32 both,
    in another order: each within float32's error bound of the exact product); SmolLM2's greedy decoding on a 2-core
    Intel Xeon 29.7-30.3 -> 33.7-35.8 tok/s, the same tokens (benchmarks/RESULTS.md).

    `weight` is then the packed tensor (a torch._mkldnn tensor: shape and dtype as before, no strides), unless other
    modules read it too (an lm_head tied to the embeddings): then it stays as it was, beside a packed copy."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eager calls the product itself: the op's dispatch costs ~5 us a call
        if torch.compiler.is_compiling():
            return torch.ops.litllm.packed_linear(x, self.packed_weight, self.bias)
        return onednn_product(x, self.packed_weight, self.bias)


# onednn_product as an op of its own, so that torch.compile calls it as is: inductor lowers oneDNN's linear only for
# weights it packed itself, as constants (freezing), and fails on one that comes in as an input. Defined with
# torch.library.Library rather than torch.library.custom_op: no autograd wrapper to pass through, 35 against 42-46 us
# a call from a compiled graph (a decode step makes 121)
_LIBRARY = torch.library.Library("litllm", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("packed_linear", onednn_product, "CompositeExplicitAutograd")  # a packed weight is a MkldnnCPU tensor


@torch.library.register_fake("litllm::packed_linear")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


def pack_weight(layer: torch.nn.Linear, shared: bool) -> None:
    """Make `layer` a PackedLinear; a `shared` weight keeps its plain form for the modules that share it."""
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 1)  # laid out for few rows
    if not shared:
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.packed_weight = packed
    layer.__class__ = PackedLinear


def inference_linears(model: torch.nn.Module, pack: bool = True) -> list[torch.nn.Linear]:
    """Give `model`'s CPU nn.Linear layers (LoRA's base and adapter layers too) the faster forward for inference, in
    place: float32 ones RowBlockLinear (except on Intel CPUs); bfloat16/float16 ones HalfLinear where this CPU's half
    products are slow, and PackedLinear where they are fast (not with `pack=False`: for a model that trains, or a
    single stream where one_row_kernel holds; nor a LoRA layer's, whose weights it reads itself). The same modules
    and parameters (tied weights stay tied), only their forward changes, and a packed layer's weight its layout.
    Returns the layers it changed."""
    from litllm.lora import LoRALinear

    held = {id(layer) for module in model.modules() if isinstance(module, LoRALinear) for layer in module.modules()}
    other_weights = {id(param) for module in model.modules() if not isinstance(module, torch.nn.Linear)
                     for param in module.parameters(recurse=False)}
    layers = []
    for module in model.modules():
        if plain_linear(module) and module.weight.device.type == "cpu" and module.weight.is_contiguous():
            kind = _inference_kind(module.weight.dtype)
            if kind is None or kind is PackedLinear and (not pack or id(module) in held):
                continue
            if kind is PackedLinear:
                pack_weight(module, shared=id(module.weight) in other_weights)
            else:
                module.__class__ = kind
            layers.append(module)
    return layers


def one_row_kernel(dtype: torch.dtype) -> bool:
    """Whether a single stream decodes faster in `dtype` with plain weights, each one-token step under onednn_off,
    than with PackedLinear's: bfloat16 on AMD CPUs with AVX512-BF16. PyTorch sends every bfloat16 product to oneDNN
    while oneDNN is enabled; disabled, a one-row product takes PyTorch's own matrix-vector kernel, which streams the
    weights faster there. On a 2-core AMD EPYC (Zen 4), a SmolLM2 decode step's 121 one-row products take 8.4-9.0 ms
    against 11.6 ms packed, and greedy decoding is ~30% faster eager and 21-46% compiled (benchmarks/RESULTS.md).

    That kernel is for one row only: with 2-8 rows (a server decoding a few requests together) plain weights are
    1.3-1.7x slower than packed, so only a single stream (LLM) takes it. A prompt's prefill stays on oneDNN, with the
    plain weights reordered per call: 1.3x packed's time at 43 rows, 5-8% more from 256 rows. Intel CPUs keep packed
    weights (not measured there)."""
    return dtype == torch.bfloat16 and _inference_kind(dtype) is PackedLinear and cpu_vendor() == "AuthenticAMD"


@contextmanager
def onednn_off() -> Iterator[None]:
    """PyTorch's own CPU kernels in place of oneDNN's for a while (see one_row_kernel). The switch is process-wide:
    meanwhile another thread's bfloat16 products take PyTorch's kernels too, which are slower for many rows and sum
    in another order (both in float32)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def one_row_steps(step: Callable) -> Callable:
    """`step` (a model, or its compiled form) with each call under onednn_off: a single stream's one-token steps."""
    def run(*args, **kwargs):
        with onednn_off():
            return step(*args, **kwargs)
    return run


def _inference_kind(dtype: torch.dtype) -> type[torch.nn.Linear] | None:
    if dtype == torch.float32:
        return None if cpu_vendor() == "GenuineIntel" else RowBlockLinear
    if dtype in (torch.bfloat16, torch.float16) and checkpoint.cpu_matmul_slowdown(dtype) >= checkpoint.SLOW:
        return HalfLinear
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return PackedLinear
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return PackedLinear
    return None


@contextmanager
def row_blocks(model: torch.nn.Module) -> Iterator[None]:
    """inference_linears for a while, for sampling from a model that trains in between (GRPO's rollouts): afterwards
    its layers are of their own classes again, as training's products (many rows) and torch.compile expect. Nothing
    changes under autocast."""
    classes = {id(module): type(module) for module in model.modules()}
    layers = [] if torch.is_autocast_enabled("cpu") else inference_linears(model, pack=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = classes[id(layer)]


def compiled_step(model: GPT) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model(input_ids, input_pos) for one-token steps, compiled with torch.compile (`--compile true`).

    torch.compile checks its guards before every call: ~4,500 for SmolLM2 (the model's structure, hooks, config and
    every parameter), 1.1 ms of a 15 ms float16 step on a 2-core AMD EPYC. This step keeps only those on its inputs,
    on the model's buffers (the KV cache, whose length changes from prompt to prompt, and the RoPE and mask tables)
    and on global state (grad mode, autocast, ...): 0.18 ms, and 12% more tokens a second (benchmarks/RESULTS.md). So
    the model's modules and parameters must not be replaced, nor change dtype or shape, once it is built (LLM's never
    do); their values may change in place, as the graph reads them at each call.

    Dynamo keeps the graphs it compiles on the code object of the function it compiles, shared by every model in
    the process, and without the dropped guards it could not tell two models apart (another dtype, another
    `rms_norm_eps`): each step is a function with a code object of its own, whose graphs are this model's alone.

    On CPU the graph's wrapper (the code that calls its kernels and products, ~20 lines a layer) is C++ rather than
    Python (inductor's cpp_wrapper): SmolLM2 on a 2-core AMD EPYC, +5-10% tokens a second in float16 and bfloat16,
    +2-3% in float32, for ~12 s more of a first compile (benchmarks/RESULTS.md).

    On CPU its products of one row are inductor's own kernels (model.linear writes them as torch.mv): a loop over
    the weight's rows on every thread, each a vectorized dot product summed in float32, which streams the weights
    faster than PyTorch's one-row kernels (SmolLM2 on a 2-core AMD EPYC with its weights on huge pages, process per
    run: float16 89-94 -> 98-100 tok/s, bfloat16 93-96 -> 101-104, float32 33 -> 55-76, where column-major weights
    were the faster layout for PyTorch's kernel; benchmarks/RESULTS.md). Inductor would compute a product's
    input inside its loop, once per weight row, where that input is an unrealized pointwise result (the RMSNorm
    before each product: the output layer 3.2 against 2.1 ms); with realize_acc_reads_threshold 0 each such result
    is a buffer of its own, and the kernels still fuse a layer's loops into one function.

    The KV cache's length (and the mask table's) is a dynamic dimension of the graph, every other shape static: one
    graph for every cache length, where each new length (prompt + answer, in steps of 256) compiled again, ~45 s
    the first time on a 2-core CPU (a chat's growing conversation every 256 tokens, and after 8 lengths Dynamo's
    recompile limit sent steps back to eager). Dynamo takes buffers' shapes as static unless its two
    force_*_static_shapes settings are off, which they are while the step runs (so while it compiles). So is
    capture_scalar_outputs on, by which the graph reads the step's position as a number (GPT.forward's kv_len) and
    attends to the positions reached, as eager does, rather than to the whole cache through a mask: 2-6% more tokens
    a second for SmolLM2 in float16 on a 2-core AMD EPYC (benchmarks/RESULTS.md). Automatic dynamic shapes are off:
    Dynamo keeps them by the code's file, line and name, the same for every model's step, so a model compiled after
    another of other weight sizes or strides took its weights' as symbols (a float16 model after a float32 one whose
    weights were column-major decoded ~12% slower)."""
    def step(input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return model(input_ids, input_pos)

    step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__)
    cpu = model.embed_tokens.weight.device.type == "cpu"
    options = {"guard_filter_fn": _no_guards_on_the_model_but_buffers, "cpp_wrapper": cpu}
    if cpu:  # every intermediate its own buffer, so that no product's kernel computes its input again (see above)
        options["realize_acc_reads_threshold"] = 0
    compiled = torch.compile(step, dynamic=None, options=options)
    marked: list[weakref.ref] = []  # the mask table whose cache was last marked dynamic (one a setup_kv_cache)
    dynamic_buffers = torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                                 force_nn_module_property_static_shapes=False,
                                                 capture_scalar_outputs=True,
                                                 automatic_dynamic_shapes=False)  # built once: 9 us a step

    def run(input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not marked or marked[0]() is not model.mask_cache:
            for tensor, dim in model.kv_cache_length_dims():
                torch._dynamo.mark_dynamic(tensor, dim)
            marked[:] = [weakref.ref(model.mask_cache)]
        with dynamic_buffers:
            return compiled(input_ids, input_pos)

    return run


def _no_guards_on_the_model_but_buffers(guards: list) -> list[bool]:
    """compiled_step's guard filter: keep a guard unless it reads `model` (the step's closure variable) for anything but
    a buffer's tensor."""
    return [not re.search(r"\bmodel\b", guard.name)
            or (guard.guard_type == "TENSOR_MATCH" and "._parameters[" not in guard.name) for guard in guards]


class OneTokenStep:
    """model(input_ids, input_pos) for one new token of one sequence (input_ids (1, 1), input_pos (1,)), eager: the same
    operations on the same tensors in the same order, so the same logits to the bit (tests/test_generate.py), without
    nn.Module calls, the attribute lookups they make and the branches that other inputs need. A decode step is ~45
    small operators a layer besides its products, and their Python overhead is a large part of it: SmolLM2 in float16
    on a 2-core AMD EPYC, 17.6-18.8 against 15.8-16.5 ms a step (benchmarks/RESULTS.md). The model runs what this does
    not: a model off the CPU, a sliding window that the cache has outgrown (it needs a mask), autocast, layers that
    fuse_projections left apart (LoRA, quantized). Built once, for a model whose layers no longer change (LLM's, evaluate's); hooks on its
    modules do not run in these steps."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        # on CPU only: F.rms_norm's equality with RMSNorm is what was checked there
        self.applies = model.embed_tokens.weight.device.type == "cpu" and all(
            block.attn.qkv_proj is not None and block.mlp.gate_up_proj is not None for block in model.layers)
        self.layers = [(block.attn, block.attn_norm, _one_row_product(block.attn.qkv_proj),
                        _one_row_product(block.attn.o_proj), block.mlp_norm, _one_row_product(block.mlp.gate_up_proj),
                        _one_row_product(block.mlp.down_proj)) for block in model.layers] if self.applies else []
        self.lm_head = _one_row_product(model.lm_head)

    def __call__(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        model, kv_len, window = self.model, int(input_pos) + 1, self.model.config.sliding_window
        if not self.applies or (window is not None and kv_len > window) or torch.is_autocast_enabled(
                input_ids.device.type):
            return model(input_ids, input_pos)
        cos, signed_sin = model.rope(input_pos, dtype=model.embed_tokens.weight.dtype)
        x = model.embed_tokens(input_ids[0])  # (1, hidden_size): products of 2-d inputs skip matmul's reshapes
        for attn, attn_norm, qkv_proj, o_proj, mlp_norm, gate_up_proj, down_proj in self.layers:
            heads, head_dim = attn.n_heads, attn.head_dim
            kv_size = attn.n_kv_heads * head_dim
            qk, v = qkv_proj(_rms_norm(attn_norm, x)).split([heads * head_dim + kv_size, kv_size], -1)
            qk, v = qk.view(1, -1, 1, head_dim), v.view(1, -1, 1, head_dim)  # (1, heads, 1, head_dim): q's, then k's
            if attn.q_norm is not None:
                qk = torch.cat((_rms_norm(attn.q_norm, qk[:, :heads]), _rms_norm(attn.k_norm, qk[:, heads:])), 1)
            qk = apply_rope(qk, cos, signed_sin)  # q and k rotated in one call: the same products as one by one
            k, v = attn.kv_cache.update(input_pos, qk[:, heads:], v)
            q = qk[:, :heads].to(k.dtype)
            y = F.scaled_dot_product_attention(q, k[:, :, :kv_len], v[:, :, :kv_len],
                                               enable_gqa=attn.n_kv_heads != attn.n_heads)
            x = x + o_proj(y.to(x.dtype).view(1, -1))
            gate, up = gate_up_proj(_rms_norm(mlp_norm, x)).chunk(2, dim=-1)
            x = x + down_proj(F.silu(gate) * up)
        return self.lm_head(_rms_norm(model.norm, x)).float().unsqueeze(0)  # (1, 1, vocab_size)


def _one_row_product(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """layer.forward for a one-row product outside autocast: where the layer computes F.linear (a 16-bit nn.Linear,
    model.Linear or HalfLinear), F.linear's own kernel with the weight bound (torch.mm on its transpose without a bias:
    F.linear's dispatch costs ~2% of a float16 step), else the forward itself."""
    if type(layer) in (torch.nn.Linear, Linear, HalfLinear) and layer.weight.dtype != torch.float32:
        if layer.bias is None:
            return functools.partial(torch.mm, mat2=layer.weight.t())
        return functools.partial(F.linear, weight=layer.weight, bias=layer.bias)
    return layer.forward


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) (model.RMSNorm) through F.rms_norm: one operator for its five, the same values to the bit (F.rms_norm
    of a 16-bit x computes in float32 and rounds once, as RMSNorm does, without the two casts around it)."""
    return norm.weight * F.rms_norm(x, (x.size(-1),), eps=norm.eps)


GREEDY_BELOW = 1e-5  # vLLM's cut too: below it, greedy is what sampling would give


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). temperature 0 is greedy (argmax)."""
    # dividing by a tinier temperature overflows the logits to inf, and the softmax of inf is NaN, which
    # multinomial refuses
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already cover top_p of the mass; the first always stays
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model: GPT, prompt: torch.Tensor, input_pos: torch.Tensor, **kwargs) -> torch.Tensor:
    """Write `prompt` (B, T) into the KV cache at `input_pos` and return the logits (B, vocab), in float32, of its last
    position, the only one sampled from: the output layer runs on that position alone (a 1000-token prompt of a 49k
    vocabulary would otherwise cost 56 GFLOP and 200 MB of logits)."""
    hidden = model(prompt, input_pos, return_hidden=True, **kwargs)
    return model.lm_head(hidden[:, -1]).float()


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    decode_step: Callable | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the last one is a stop id if generation stopped on one.

    `decode_step` runs the one-token steps instead of `model` (LLM passes its torch.compile'd model).
    """
    check_sampling(temperature, top_k, top_p)
    if not prompt_ids:
        raise UserError("the prompt is empty (no tokens): give some text to continue")
    max_new_tokens = check_length(len(prompt_ids), max_new_tokens, model.config.max_seq_len)
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = set(stop_ids)
    decode_step = model if decode_step is None else decode_step
    # cache lengths in steps of 256, so a compiled decode step sees few distinct shapes (no recompiles)
    cache_len = min(model.config.max_seq_len, -(-(len(prompt_ids) + max_new_tokens) // 256) * 256)
    model.setup_kv_cache(batch_size=1, max_seq_len=cache_len)
    try:
        input_pos = torch.arange(len(prompt_ids), device=device)
        logits = prefill(model, torch.tensor([prompt_ids], device=device), input_pos)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            yield int(token)
            if int(token) in stop_ids or step + 1 == max_new_tokens:  # no step for a token that will not be sampled
                return
            input_pos = input_pos[-1:] + 1
            logits = decode_step(token.view(1, 1), input_pos)[:, -1]
    finally:
        model.clear_kv_cache()


@torch.inference_mode()
def sample_continuations(
    model: GPT,
    prompt_ids: list[int],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """`n` continuations of one prompt, sampled together: the prompt is prefilled once, its KV cache row copied `n`
    times, and the `n` rows decode in one batch until each has reached a stop id (kept, last) or `max_new_tokens`.

    The draws depend only on the model and `generator`, so a seeded generator gives the same continuations again.
    On CPU in float32 (except on Intel CPUs) the linear layers compute in row blocks meanwhile (row_blocks: GRPO's
    rollouts of 8 answers 1.2-1.3x faster with 2 threads on an AMD EPYC, benchmarks/RESULTS.md).
    """
    check_sampling(temperature, top_k, top_p)
    max_new_tokens = check_length(len(prompt_ids), max_new_tokens, model.config.max_seq_len)
    device = model.embed_tokens.weight.device
    stop_ids = set(stop_ids)
    model.setup_kv_cache(batch_size=1, max_seq_len=len(prompt_ids) + max_new_tokens)
    try:
        with row_blocks(model):
            logits = prefill(model, torch.tensor([prompt_ids], device=device),
                             torch.arange(len(prompt_ids), device=device))
            model.restore_kv_cache_rows(model.kv_cache_snapshot(), torch.zeros(n, dtype=torch.long, device=device))
            logits = logits.expand(n, -1)
            continuations: list[list[int]] = [[] for _ in range(n)]
            running = set(range(n))
            for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
                tokens = sample(logits, temperature, top_k, top_p, generator)
                for row, token in enumerate(tokens.tolist()):
                    if row in running:
                        continuations[row].append(token)
                        if token in stop_ids:
                            running.discard(row)
                if not running or position + 1 == len(prompt_ids) + max_new_tokens:
                    break
                # finished rows decode on with the others (their tokens are dropped): the batch keeps one shape
                logits = model(tokens.view(n, 1), torch.tensor([position], device=device))[:, -1]
    finally:
        model.clear_kv_cache()
    return continuations


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    """Sampling settings out of range are user errors (a temperature below GREEDY_BELOW decodes greedily)."""
    if not temperature >= 0:
        raise UserError(f"temperature must be 0 (greedy) or above, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (or unset), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def check_length(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """The number of new tokens that fit the context; a prompt that alone fills it is a user error."""
    if prompt_len >= context:
        raise UserError(
            f"the prompt is {prompt_len} tokens but the model's context is {context}; shorten the prompt"
        )
    return min(max_new_tokens, context - prompt_len)


def stream_text(tokenizer, tokens: Iterable[int], stop: list[str] | None = None) -> Iterator[str]:
    """Turn a token stream into text pieces, ending before any stop id or stop string (see TextStream)."""
    text = TextStream(tokenizer, stop)
    for token in tokens:
        if piece := text.add(token):
            yield piece
        if text.finished:
            return
    if piece := text.flush():
        yield piece


class TextStream:
    """The text of a growing token sequence, one piece per token, ending before any stop id or stop string.

    Text is re-decoded from all tokens so far (a Korean syllable can span tokens); a piece is held back
    while it ends in a partial UTF-8 character or could be the start of a stop string. Tokens are pushed
    in (`add`), so a server can feed many sequences from one decoding loop.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or [] if s]
        self.stop_ids = set(tokenizer.stop_ids)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finished = False  # a stop id or stop string was reached: add no more tokens

    def add(self, token: int) -> str:
        """The new text that `token` makes safe to show ("" while it is held back)."""
        if token in self.stop_ids:
            self.finished = True
            return self.flush()
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        hits = [h for h in (self.text.find(s, self.emitted) for s in self.stop) if h >= 0]
        if hits:
            self.finished = True
            piece, self.emitted = self.text[self.emitted:min(hits)], len(self.text)
            return piece
        safe = len(self.text) - _partial_stop_length(self.text, self.stop)
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """The text held back so far, once no more tokens will come."""
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def _partial_stop_length(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string.

    Only the ends that start with a stop string's first character are compared, so a server checking every
    row at every token pays about the stop strings' length, not its square."""
    longest = 0
    for s in stop:
        tail = text[-(len(s) - 1):] if len(s) > 1 else ""
        start = tail.find(s[0])
        while start >= 0 and not s.startswith(tail[start:]):
            start = tail.find(s[0], start + 1)
        if start >= 0:
            longest = max(longest, len(tail) - start)
    return longest

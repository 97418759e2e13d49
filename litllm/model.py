"""One decoder-only transformer for Llama, Mistral, Qwen2 and Qwen3, and the same with a scalar head
(RewardGPT) for reward models.

The families differ only through Config flags: grouped-query attention (n_kv_heads), RoPE base and
scaling, sliding-window attention, q/k/v bias, per-head q/k RMSNorm, tied embeddings. Module leaf names
(q_proj, gate_proj, ...) are Hugging Face's, so LoRA targets and adapters use the names people know.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from litllm.config import Config
from litllm.rope import RotaryEmbedding, apply_rope


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # one matrix maps tokens to vectors and back: fewer parameters, as the checkpoint was trained
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config)
        self.mask_cache: torch.Tensor | None = None  # (max_seq_len, max_seq_len) bool, set with the KV cache
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache_rows: slice | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32, or with `return_hidden` the final normed hidden states
        (B, T, hidden_size), which training turns into a loss chunk by chunk (see training.py).

        Without `input_pos` this is one causal pass over the whole sequence (training, scoring). With
        `input_pos` (T,) the tokens are written into the KV cache at those positions and attend to
        everything cached so far (prefill, then one token per decode step). With `input_pos` (B, T) each
        row sits at its own positions and attends only to the cache up to the longest row (a server decodes
        sequences of different lengths together); `cache_rows` says which rows of the KV cache the B input
        rows are (default: all of them, in order), so one request can be prefilled into its own row.

        Packed training rows pass `position_ids` and `document_ids` (B, T): positions restart and attention
        stops at each document boundary, so packed documents never see each other. Any other layout passes
        `position_ids` and `attention_mask` (B, T, T), True where token i may attend to token j: evaluate packs a
        question's answers into one row, each answer seeing the question and its own tokens only.
        """
        T = input_ids.size(1)
        window = self.config.sliding_window
        kv_len = None  # attention reads the KV cache up to here (None: all of it)
        if input_pos is not None:
            if self.mask_cache is None:
                raise RuntimeError("input_pos needs a KV cache: call model.setup_kv_cache(...) first")
            positions = input_pos
            mask = self.mask_cache[input_pos]  # (T, max_seq_len): what each new token may attend to
            # only the cached positions some row has reached, not the whole cache (compiled, a number the graph
            # reads at each step: one graph for every position, decode.compiled_step)
            kv_len = int(input_pos.max()) + 1
            torch._check(kv_len >= 1)  # (compiled: kv_len is read in the graph, and these bound it there)
            torch._check(kv_len <= self.mask_cache.size(1))
            mask = mask[..., :kv_len]
            if input_pos.dim() == 2:
                mask = mask.unsqueeze(1)  # (B, 1, T, kv_len)
            elif T == 1 and (window is None or not torch.compiler.is_compiling() and kv_len <= window):
                # (compiled, a window keeps its mask: kv_len is a number the graph reads, not one to branch on)
                mask = None  # one new token that sees every cached position: no mask to apply (SDPA is faster without)
        elif document_ids is not None:
            positions = position_ids
            same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
            mask = (same_document & build_mask(T, window, input_ids.device)).unsqueeze(1)  # (B, 1, T, T)
        elif attention_mask is not None:
            positions = position_ids
            mask = attention_mask
            if window is not None:
                mask = mask & (positions.unsqueeze(2) - positions.unsqueeze(1) < window)
            mask = mask.unsqueeze(1)  # (B, 1, T, T)
        else:
            positions = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
            mask = None if window is None or T <= window else build_mask(T, window, input_ids.device)
        cos, signed_sin = self.rope(positions, dtype=self.embed_tokens.weight.dtype)
        if cos.dim() == 3:  # per-row positions (B, T, head_dim): broadcast over heads
            cos, signed_sin = cos.unsqueeze(1), signed_sin.unsqueeze(1)
        x = self.embed_tokens(input_ids)  # (B, T, hidden_size)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                # keep only each block's input; recompute its insides during backward
                x = checkpoint(block, x, cos, signed_sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, signed_sin, mask, input_pos, cache_rows, kv_len)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x).float()

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate keys/values for `max_seq_len` positions, so decode steps never reallocate."""
        device = self.embed_tokens.weight.device
        if dtype is None:
            # PyTorch's CPU attention kernels are several times slower in bfloat16/float16 than in float32
            # (measured: 300-700 us vs 40 us per decode step and layer), and the cache is small
            dtype = torch.float32 if device.type == "cpu" else self.embed_tokens.weight.dtype
        shape = (batch_size, self.config.n_kv_heads, max_seq_len, self.config.head_dim)
        for block in self.layers:
            block.attn.kv_cache = KVCache(shape, dtype, device)
        self.mask_cache = build_mask(max_seq_len, self.config.sliding_window, device)

    def clear_kv_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None
        self.mask_cache = None

    def kv_cache_length_dims(self) -> list[tuple[torch.Tensor, int]]:
        """(tensor, dimension) for each dimension that is the KV cache's length: the keys' and values' positions and
        the mask table's rows and columns (decode.compiled_step takes them as dynamic)."""
        dims = [(t, 2) for block in self.layers for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        return dims + [(self.mask_cache, 0), (self.mask_cache, 1)]

    def kv_cache_bytes(self) -> int:
        return sum(block.attn.kv_cache.k.nbytes + block.attn.kv_cache.v.nbytes for block in self.layers
                   if block.attn.kv_cache is not None)

    def kv_cache_snapshot(self) -> list[KVCache]:
        """The KV cache as it is now (the tensors themselves, not a copy), to start later rows from with
        `restore_kv_cache_rows`, e.g. a prefilled context whose continuations each run on a copy of it."""
        return [block.attn.kv_cache for block in self.layers]

    def restore_kv_cache_rows(self, snapshot: list[KVCache], rows: torch.Tensor) -> None:
        """Give every layer a new cache whose row i is a copy of row `rows[i]` of `snapshot` (the snapshot itself is
        never written to again)."""
        for block, cache in zip(self.layers, snapshot):
            block.attn.kv_cache = cache.select_rows(rows)


class RewardGPT(GPT):
    """GPT with a scalar head, `score`, in place of lm_head: one reward per sequence, read from the final hidden
    state of its last token that is not padding (the rightmost token other than config.pad_token_id, or the last
    token without one). This is transformers' *ForSequenceClassification with num_labels=1, rule included, so its
    checkpoints and PEFT adapters load there and score the same. A sequence that ends in the pad token (e.g. EOS
    where EOS pads) is read at the token before."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        del self.lm_head  # never used: a reward model predicts no tokens
        self.score = Linear(config.hidden_size, 1, bias=False)
        self._init_weights(self.score)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) in float32 for right- or left-padded token ids (B, T)."""
        hidden = super().forward(input_ids, return_hidden=True)  # (B, T, hidden_size)
        last = last_token_positions(input_ids, self.config.pad_token_id)
        return self.score(hidden[torch.arange(input_ids.size(0), device=hidden.device), last]).squeeze(-1).float()


def last_token_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Each row's rightmost position that does not hold `pad_id` (B,); the last position without a pad id."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    if pad_id is None:
        return positions[-1].expand(input_ids.size(0))
    return (positions * (input_ids != pad_id)).argmax(dim=1)


def fuse_projections(model: GPT) -> None:
    """For inference, in place: each block's q_proj, k_proj and v_proj become one linear layer (qkv_proj), and
    gate_proj and up_proj another (gate_up_proj). They read the same input, so one product streams the weights three
    (two) did, in fewer and larger calls: SmolLM2's greedy decoding on a 2-core CPU 7% faster in float32, 4% in
    bfloat16, the same in float16 (benchmarks/RESULTS.md), with the same logits. The separate layers are gone
    afterwards (their weights are parts of the fused ones), so only for a model that is not trained or saved again;
    layers that are not plain linear layers (LoRA adapters, quantized weights) stay as they are."""
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if attn.qkv_proj is None and all(map(plain_linear, (attn.q_proj, attn.k_proj, attn.v_proj))):
            attn.qkv_proj = _concatenated(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
        if mlp.gate_up_proj is None and plain_linear(mlp.gate_proj) and plain_linear(mlp.up_proj):
            mlp.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj


def _concatenated(*layers: nn.Linear) -> nn.Linear:
    """One linear layer whose outputs are those of `layers` (same input), end to end."""
    first = layers[0]
    fused = Linear(first.in_features, sum(layer.out_features for layer in layers), bias=first.bias is not None,
                   device="meta")
    fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    return fused


class Linear(nn.Linear):
    """nn.Linear whose large float32 products run on oneDNN where that is the faster kernel (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is a float linear layer as the model builds it (Linear, or torch's own nn.Linear): not a LoRA,
    quantized or inference-only layer."""
    return type(module) in (Linear, nn.Linear)


ONEDNN_MIN_PRODUCT = 1 << 24  # multiply-adds from which oneDNN's float32 product beats MKL's (its start-up is ~20 us)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with gradients; under CPU autocast with a frozen weight's kept copy
    (frozen_autocast_copy); through OneDNNLinear for a float32 product of at least ONEDNN_MIN_PRODUCT multiply-adds
    on a CPU where oneDNN's float32 products are the faster (onednn_float32), outside autocast. torch.compile picks
    its own kernels; on CPU a product of one row (a compiled decode step's) is written as torch.mv, which inductor
    compiles into a reduction of its own rather than calling PyTorch's kernel: see decode.compiled_step."""
    # is_compiling first: Dynamo would trace into onednn_float32 (and warn that it ignores functools.cache)
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and x.numel() == weight.size(1):
            product = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.size(0))
            return product if bias is None else product + bias
        return F.linear(x, weight, bias)
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu"):
        return F.linear(x, frozen_autocast_copy(weight), bias)
    if takes_onednn(x, weight):
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) outside autocast and torch.compile runs oneDNN's float32 product on this CPU."""
    return (x.dtype == weight.dtype == torch.float32 and x.numel() * weight.size(0) >= ONEDNN_MIN_PRODUCT
            and type(weight) in (torch.Tensor, nn.Parameter) and onednn_float32())


_autocast_copies = torch.utils.weak.WeakIdKeyDictionary()  # weight -> ((data_ptr, version, dtype), copy)


def frozen_autocast_copy(weight: torch.Tensor) -> torch.Tensor:
    """A frozen float32 weight in CPU autocast's dtype, kept while the weight keeps its data and version (in-place
    changes and loading a state dict change the version); anything else as it is. Autocast casts a frozen weight
    (LoRA's base layers) again in every forward, where it casts a trained one once per autocast region: each step
    a new bfloat16 copy of the whole base model. A copy is kept only from a forward that records gradients, whose
    backward keeps the same copies until each layer's gradient (so peak memory stays the same); a forward without
    gradients (a reference model's, generation) uses a kept copy but keeps no new one. Under torch.compile a plain
    cast, in the graph: Dynamo cannot read the kept copies' dictionary, and broke each LoRA block's graph at every
    adapted layer (SmolLM2 LoRA in bf16-mixed on a 2-core AMD EPYC: compiled 1.11-1.18x eager's tokens/s, was 1.01x)."""
    dtype = torch.get_autocast_dtype("cpu")
    if weight.requires_grad or weight.dtype != torch.float32 or dtype == torch.float32:
        return weight
    if torch.compiler.is_compiling():
        return weight.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype)
    kept = _autocast_copies.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    copy = weight.to(dtype)
    if torch.is_grad_enabled():
        _autocast_copies[weight] = (key, copy)
    return copy


def autocast_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a product under the current autocast multiplies by it, for a product taken outside autocast
    later (a backward): a frozen CPU weight's kept copy (frozen_autocast_copy), else a cast to autocast's dtype;
    outside autocast the weight itself."""
    device = weight.device.type
    if not torch.is_autocast_enabled(device) or not weight.is_floating_point():
        return weight
    if device == "cpu":
        return frozen_autocast_copy(weight)
    return weight.to(torch.get_autocast_dtype(device))


@functools.cache
def onednn_float32() -> bool:
    """Whether this CPU runs float32 products faster on oneDNN than on PyTorch's default CPU kernel (MKL's): AMD CPUs
    with AVX-512, where MKL runs its AVX2 code and oneDNN AVX-512. On a 2-core AMD EPYC (Zen 4), SmolLM2's products at
    a training step's shapes are 1.05-1.4x faster (forward and the input's gradient), a LoRA step 6-15% and a full
    fine-tuning step ~12% (benchmarks/RESULTS.md). Intel CPUs, where MKL uses AVX-512 itself, keep MKL."""
    if not torch.backends.mkldnn.is_available() or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return cpu_vendor() == "AuthenticAMD"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it ("GenuineIntel", "AuthenticAMD", ...); "" where it cannot tell (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN's linear, for a plain weight (reordered for the call) or one prepacked by
    torch.ops.mkldnn._reorder_linear_weight (decode.PackedLinear)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) through oneDNN: the product, and in backward the input's gradient; the weight's
    gradient (when it trains) is PyTorch's product, as fast there. The values are F.linear's but for the kernels'
    rounding (sums in another order; tests/test_model.py holds both to float64's within float32's error bound)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ weight, as a linear layer whose weight is weight.T
            grad_x = onednn_product(grad, weight.T)
        rows = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[1]:
            grad_weight = rows.T @ x.reshape(-1, x.size(-1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def build_mask(size: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """(size, size) bool, True where query i may attend to key j: causal, and within the window."""
    i = torch.arange(size, device=device).unsqueeze(1)
    j = torch.arange(size, device=device).unsqueeze(0)
    mask = j <= i
    if sliding_window is not None:
        mask &= i - j < sliding_window
    return mask


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, signed_sin, mask, input_pos, cache_rows=None, kv_len=None):
        x = x + self.attn(to_autocast_dtype(self.attn_norm(x)), cos, signed_sin, mask, input_pos, cache_rows, kv_len)
        return x + self.mlp(to_autocast_dtype(self.mlp_norm(x)))


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype under autocast, else as it is: a norm's output cast once for all the layers that read it
    (q, k, v and gate, up, and their adapters), where autocast casts it again in each of them and each keeps its own
    copy for backward. The products see the same values; in backward the layers' gradients for x add up in bfloat16
    before the cast back, not in float32 after it (the adapters' gradients stay as close to float32's: 3.7% relative
    error either way for SmolLM2 LoRA, benchmarks/RESULTS.md). A SmolLM2 LoRA step under bf16 autocast on CPU: ~7%
    faster."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.hidden_size, config.n_heads * config.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, config.n_kv_heads * config.head_dim, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, config.n_kv_heads * config.head_dim, bias=config.attention_bias)
        self.o_proj = Linear(config.n_heads * config.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            # Qwen3 normalizes each head's queries and keys, which keeps attention logits bounded
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: nn.Linear | None = None  # q_proj, k_proj and v_proj as one layer, for inference (fuse_projections)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, signed_sin, mask, input_pos, cache_rows=None, kv_len=None):
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2, -1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_heads or n_kv_heads, T, head_dim)
        q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows)  # (B, n_kv_heads, max_seq_len, head_dim)
            if kv_len is not None:  # only as far as the positions reached (see GPT.forward)
                torch._check(kv_len <= k.size(2))  # (bounds kv_len for the compiled graph, as in GPT.forward)
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            q = q.to(k.dtype)  # the cache may be float32 (see setup_kv_cache)
        if mask is None and input_pos is None:
            y = causal_attention(q, k, v)  # (B, n_heads, T, head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        if not torch.is_autocast_enabled(y.device.type):  # under autocast o_proj takes it as it is
            y = y.to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True) for q (B, n_heads, T, head_dim) and k, v (B, n_kv_heads,
    T, head_dim); where it runs in bfloat16 on CPU (autocast's cast, or bfloat16 inputs) with gradients, through
    BFloat16CausalAttention: the same output, and a float32 backward."""
    if (not torch.compiler.is_compiling() and q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if torch.is_autocast_enabled("cpu"):  # as autocast casts attention's inputs
            q, k, v = (t.to(torch.get_autocast_dtype("cpu")) for t in (q, k, v))
        if q.dtype == k.dtype == v.dtype == torch.bfloat16:
            return BFloat16CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


class BFloat16CausalAttention(torch.autograd.Function):
    """Causal attention of bfloat16 q, k, v on CPU: PyTorch's flash attention forward (SDPA's own kernel, the same
    output), and its float32 backward on float32 copies of q, k, v, the output and its gradient. PyTorch's bfloat16
    flash backward is the slower of the two on CPU (SmolLM2's 4 x 256-token attention, forward and backward: ~13.5 vs
    ~11.2 ms), and the further from exact (relative error of the gradients against float64 from the same inputs:
    q 2.9e-3, k 4.7e-3, v 4.6e-3 against 2.4e-3, 2.3e-3, 1.7e-3, their rounding to bfloat16 alone)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, True)
        return tuple(grad.to(torch.bfloat16) for grad in grads)


class KVCache(nn.Module):
    """Keys and values (B, n_kv_heads, max_seq_len, head_dim) of every position decoded so far, per row."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache whose row i is a copy of this one's row `rows[i]`."""
        copied = KVCache((0,), self.k.dtype, self.k.device)
        copied.k, copied.v = self.k.index_select(0, rows), self.v.index_select(0, rows)
        return copied

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice | None = None):
        """Write k, v (B, n_kv_heads, T, head_dim) at `input_pos`, (T,) or per row (B, T), into cache `rows`."""
        # in place at the new positions: the cache is allocated once, never grown; a slice of rows is a view
        cache_k, cache_v = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])
        if input_pos.dim() == 1:
            cache_k.index_copy_(2, input_pos, k.to(cache_k.dtype))
            cache_v.index_copy_(2, input_pos, v.to(cache_v.dtype))
        else:
            index = input_pos[:, None, :, None].expand_as(k)  # (B, n_kv_heads, T, head_dim)
            cache_k.scatter_(2, index, k.to(cache_k.dtype))
            cache_v.scatter_(2, index, v.to(cache_v.dtype))
        return cache_k, cache_v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # gate_proj and up_proj as one layer, for inference (fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(swiglu(*self.gate_up_proj(x).chunk(2, dim=-1)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. Where gradients are wanted, through SwiGLU, which keeps less for backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward, where silu(gate) is recomputed: autograd would also keep
    silu(gate), one (tokens, intermediate_size) activation more per block (189 MB for SmolLM2 at 4 x 256 tokens in
    float32). The gradients are the ones autograd computes for `F.silu(gate) * up`, op for op (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 even for bf16/fp16 activations, as the reference implementations do
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

"""Losses and log-probabilities at target positions, computed a chunk of tokens at a time.

A target is a token whose label is not IGNORE_INDEX; labels are not shifted (position t holds token t), so hidden
state t predicts label t + 1. Only target positions go through lm_head, and only `chunk_size` of them at once: the
float32 logits of a 50k-150k word vocabulary never exist for the whole batch.
"""
from __future__ import annotations

import math
import weakref
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from litllm.data import IGNORE_INDEX
from litllm.model import linear


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """The target tokens of a batch: the units a next-token loss is averaged over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_row_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's target tokens (rows,)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


def target_hidden(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states (N, hidden_size) that predict the N target tokens, the targets (N,), and their rows (N,)."""
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX  # (B, T - 1)
    return hidden[:, :-1][keep], targets[keep], keep.nonzero()[:, 0]


def cross_entropy_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Next-token cross-entropy summed over the target tokens: -token_logprobs(...).sum(), computed faster.

    hidden is the model's final normed output (B, T, hidden_size), labels (B, T). For a plain lm_head, the gradients
    come out of the forward pass (see LinearCrossEntropy); a wrapped one (LoRA on lm_head) goes through
    token_logprobs, which recomputes each chunk's logits in backward.
    """
    hidden, targets, _ = target_hidden(hidden, labels)
    if _plain_linear(lm_head):
        if not torch.is_grad_enabled():  # e.g. validation: no gradients computed
            return linear_cross_entropy(hidden, lm_head.weight, targets, chunk_size)[0]
        return LinearCrossEntropy.apply(hidden, lm_head.weight, targets, chunk_size)
    return -token_logprobs(lm_head, hidden, targets, chunk_size)[0].sum()


def _plain_linear(lm_head: nn.Module) -> bool:
    """A linear layer without bias whose weight is the matrix itself (not a quantized one, nor LoRA-wrapped)."""
    return isinstance(lm_head, nn.Linear) and lm_head.bias is None and lm_head.weight.is_floating_point()


def token_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) for each of N hidden states (N, hidden_size) and targets (N,): a float32 (N,) tensor, and a bool
    (N,) saying where the target is the most likely token (the greedy choice).

    Log-softmax in float32 over the whole vocabulary. With gradients enabled, each chunk's logits are recomputed in
    backward rather than kept.
    """
    return _by_chunks(_chunk_logprobs, lm_head, hidden, targets, chunk_size)


def token_logprobs_and_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) (N,) as token_logprobs computes it, but from the logits divided by `temperature` (the
    distribution a sampler at that temperature draws from), and the entropy (N,) of each of those N distributions,
    in nats (detached: a metric, e.g. of how freely a policy still samples)."""
    logprobs, entropy = _by_chunks(partial(_chunk_logprobs_and_entropy, temperature=temperature), lm_head, hidden,
                                   targets, chunk_size)
    return logprobs, entropy.detach()


def target_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                    temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) (N,) float32 at `temperature` for N hidden states and targets, and, if asked for, each
    distribution's entropy (N,) in nats, detached (else None): token_logprobs_and_entropy's numbers.

    A frozen plain lm_head (LoRA without lm_head among its targets, a reference model) goes through LinearLogprobs:
    two output-layer products per chunk instead of three when gradients flow, and no entropy unless asked for.
    """
    if _plain_linear(lm_head) and not lm_head.weight.requires_grad:
        if torch.is_grad_enabled():
            logprobs, entropies = LinearLogprobs.apply(hidden, lm_head.weight, targets, chunk_size, temperature,
                                                       entropy)
            return logprobs, entropies if entropy else None
        return linear_logprobs(hidden, lm_head.weight, targets, chunk_size, temperature, entropy)[:2]
    if not entropy and temperature == 1.0:
        return token_logprobs(lm_head, hidden, targets, chunk_size)[0], None
    logprobs, entropies = token_logprobs_and_entropy(lm_head, hidden, targets, chunk_size, temperature)
    return logprobs, entropies if entropy else None


def _by_chunks(function, lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`function(lm_head, hidden chunk, targets chunk)` -> two (chunk,) tensors, over chunks of at most `chunk_size`
    tokens, concatenated; with gradients enabled each chunk's logits are recomputed in backward rather than kept.
    No tokens is one empty chunk, whose results still hang off the graph (a backward through them gives zeros).

    Without gradients each chunk's results are written into the two outputs at once. Kept as pieces to the end, a
    chunk's small results could take their memory from the (chunk, vocab) logits freed just before. The next chunk's
    logits then no longer fit there. Under keep_freed_memory (training, evaluate on CPU) glibc's heap grew by about a
    chunk's logits per chunk: `litllm evaluate`'s perplexity of 8 SmolLM2 documents peaked at 3.2-4.5 GB RSS in most
    processes, against 1.4-1.7 GB this way (benchmarks/RESULTS.md)."""
    step = max(chunk_size, 1)
    chunks = zip(hidden.split(step), targets.split(step))
    if torch.is_grad_enabled():
        first, second = zip(*(checkpoint(function, lm_head, h, t, use_reentrant=False) for h, t in chunks))
        return torch.cat(first), torch.cat(second)
    outputs = None
    for start, (h, t) in zip(range(0, max(hidden.size(0), 1), step), chunks):
        results = function(lm_head, h, t)
        if outputs is None:
            outputs = tuple(result.new_empty(hidden.size(0)) for result in results)
        for output, result in zip(outputs, results):
            output[start:start + step] = result
    return outputs


def _chunk_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden)  # (chunk, vocab), in float32 (float64 stays: evaluate's tests compare float64 runs)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = logits.log_softmax(dim=-1)  # as the references compute it (HF, lm-eval): equal to the last bit
    return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1), logits.argmax(dim=-1) == targets


def _chunk_logprobs_and_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = (lm_head(hidden).float() / temperature).log_softmax(dim=-1)  # (chunk, vocab)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1), entropy


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """log p(sequence): each row's target-token log-probabilities summed, (rows,) float32."""
    hidden = model(batch["input_ids"], return_hidden=True)  # (rows, T, hidden_size)
    hidden, targets, row_of_token = target_hidden(hidden, batch["labels"])
    logprobs, _ = target_logprobs(model.lm_head, hidden, targets, chunk_size)
    totals = torch.zeros(batch["labels"].size(0), dtype=torch.float32, device=logprobs.device)
    return totals.index_add(0, row_of_token, logprobs)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) with its gradients computed chunk by chunk in forward.

    d loss / d logits = softmax(logits) - onehot(target) is known as soon as a chunk's logits are, so the
    gradients for hidden (and weight) are accumulated right away and the logits freed: no logits are kept
    for backward and none are recomputed. Under torch.no_grad() call linear_cross_entropy directly: in here
    needs_input_grad says which inputs require grad, not whether gradients are wanted. One backward per forward: it
    scales the saved weight gradient in place (a second, with retain_graph, stops with autograd's in-place error).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        total, grad_hidden, grad_weight = linear_cross_entropy(hidden, weight, targets, chunk_size,
                                                               *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        # scaled in place: the (vocab, hidden) gradient is used once, and a scaled copy would be one more of its size
        grad_weight = None if grad_weight is None else grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return (grad_hidden * grad_total.to(grad_hidden.dtype)).to(ctx.hidden_dtype), grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                         hidden_grad: bool = False, weight_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss (float32), and the gradients of it asked for (None otherwise): d/d hidden in hidden's dtype
    (the autocast dtype under autocast), d/d weight in float32."""
    # mixed precision: the matmuls in the autocast dtype as autocast would run them, but the weight cast once rather
    # than twice per chunk, and softmax's gradient cast once to it (not float32 into the matmul)
    buffers = ChunkBuffers.for_device(hidden.device)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), buffers.cast_weight(weight, dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if hidden_grad or weight_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        # (chunk, vocab) float32 in one fused pass over the product, as F.cross_entropy computes it; logsumexp and a
        # subtraction would each allocate and fill another chunk-sized tensor
        logprobs = buffers.log_softmax(linear(h, weight))
        total -= logprobs.gather(1, t.unsqueeze(1)).sum()
        if grad_hidden is not None:
            grad_logits = logprobs.exp_()  # softmax, in place
            grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1
            grad_logits = buffers.cast(grad_logits, h.dtype)
            grad_hidden[start:start + chunk_size] = linear(grad_logits, weight.T)  # grad_logits @ weight
            if grad_weight is None:
                continue
            if h.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)  # summed into place: no (vocab, hidden) product apart
            else:  # summed in float32 without a float32 copy of the product, which goes into a kept tensor
                grad_weight += buffers.product(grad_logits.T, h)
    return total, grad_hidden, grad_weight


class ChunkBuffers:
    """The chunk loops' (chunk, vocab) tensors and the output layer's weight in the autocast dtype, kept from one chunk
    to the next and, on CPU, from one call to the next, rather than allocated anew. On Linux a new tensor of 50 MB
    (256 x 49152 float32) is a new memory mapping (glibc maps each allocation above 32 MB anew), whose first writes take
    a page fault per 4 KiB: ~12 thousand, ~9 ms on a 2-core Intel Xeon, for each such tensor; SmolLM2's weight cast to
    bfloat16 anew took ~70 ms a step (benchmarks/RESULTS.md). Elsewhere the device's caching allocator reuses memory
    already, and kept tensors would hold device memory between calls: there each call has its own. The values are those
    of `logits.float().log_softmax(-1)` and `.to(dtype)`, bit for bit: the same kernels, writing into kept tensors.

    One chunk loop at a time per process (the training scripts' losses; the server, which runs a thread per request,
    does not come here): the tensors handed out are overwritten by the next chunk."""

    _kept_on_cpu: ChunkBuffers | None = None

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kept: dict[tuple, torch.Tensor] = {}
        self.weight_source: tuple | None = None  # (a weak reference to it, its data pointer, its version)

    @classmethod
    def for_device(cls, device: torch.device) -> ChunkBuffers:
        if torch.device(device).type != "cpu":
            return cls(device)
        if cls._kept_on_cpu is None:
            cls._kept_on_cpu = cls(torch.device("cpu"))
        return cls._kept_on_cpu

    def cast_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """weight.to(dtype), into a kept tensor. A frozen weight (a frozen output layer) is cast once while it is the
        same tensor with the same data and version (in-place changes, a loaded state dict, change the version); a
        trained one at each call: PyTorch's fused AdamW changes a weight in place without changing its version."""
        if weight.dtype == dtype:
            return weight
        source = (weakref.ref(weight), weight.data_ptr(), weight._version)
        cast = self._tensor("weight", weight.shape, dtype)
        if (weight.requires_grad or self.weight_source is None or self.weight_source[0]() is not weight
                or self.weight_source[1:] != source[1:]):
            with torch.no_grad():  # for the chunk loops, which take the weight's gradient themselves
                cast.copy_(weight)
            self.weight_source = source
        return cast

    def log_softmax(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log_softmax(logits / temperature) over the last dimension, float32; float32 logits are divided in place."""
        if logits.dtype != torch.float32:
            logits = self._tensor("logits", logits.shape).copy_(logits)
        if temperature != 1.0:
            logits.div_(temperature)
        return torch.ops.aten._log_softmax.out(logits, -1, False, out=self._tensor("logprobs", logits.shape))

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b, into a kept tensor: a chunk's share of the output layer's weight gradient (SmolLM2: 57 MB bfloat16),
        anew, took ~14 ms more a chunk (benchmarks/RESULTS.md)."""
        return torch.mm(a, b, out=self._tensor("product", (a.size(0), b.size(1)), a.dtype))

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x if x.dtype == dtype else self._tensor("cast", x.shape, dtype).copy_(x)

    def _tensor(self, name: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized tensor: the first chunk's (the largest), or a view of its first rows."""
        kept = self.kept.get((name, dtype))
        if kept is None or kept.shape[1:] != shape[1:] or kept.size(0) < shape[0]:
            kept = self.kept[name, dtype] = torch.empty(shape, dtype=dtype, device=self.device)
        return kept[:shape[0]]


class LinearLogprobs(torch.autograd.Function):
    """log p(target) (N,) float32 at a temperature, for hidden states (N, hidden_size) and a frozen output layer's
    weight, with the gradient for hidden computed chunk by chunk in forward; and the entropies (N,), detached, if
    asked for (else an empty tensor).

    d log p(t) / d hidden = -(softmax(logits / temperature) - onehot(t)) @ W / temperature is known as soon as a
    chunk's logits are, so its product is taken then (N x hidden_size, as much as hidden itself) and backward only
    scales each row, in float32, by its token's incoming gradient. token_logprobs instead keeps nothing and recomputes
    each chunk's logits in backward: three products of the chunk with the vocabulary-sized weight against two here.
    The weight gets no gradient: where the output layer trains, target_logprobs takes the recomputing path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, entropy):
        assert not ctx.needs_input_grad[1], "LinearLogprobs computes no gradient for the weight"
        logprobs, entropies, softmax_grad = linear_logprobs(hidden, weight, targets, chunk_size, temperature,
                                                            entropy, ctx.needs_input_grad[0])
        ctx.save_for_backward(softmax_grad)
        ctx.hidden_dtype, ctx.temperature = hidden.dtype, temperature
        entropies = logprobs.new_empty(0) if entropies is None else entropies
        ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, _):
        (softmax_grad,) = ctx.saved_tensors
        scale = grad_logprobs * (-1 / ctx.temperature)  # (N,) float32
        return (softmax_grad.float() * scale.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                    temperature: float = 1.0, entropy: bool = False, softmax_grad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p(target) (N,) float32 at `temperature`, equal to token_logprobs_and_entropy's (the same logits, log-softmax
    in float32); the entropies (N,) if `entropy` (else None); and if `softmax_grad` (else None) the product
    (softmax(logits / temperature) - onehot(target)) @ weight (N, hidden_size), in hidden's dtype (the autocast dtype
    under autocast), which is -temperature times d log p(target_i) / d hidden_i."""
    buffers = ChunkBuffers.for_device(hidden.device)
    if torch.is_autocast_enabled(hidden.device.type):  # as linear_cross_entropy: the weight cast once
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), buffers.cast_weight(weight, dtype)
    logprobs = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    entropies = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device) if entropy else None
    products = torch.empty_like(hidden) if softmax_grad else None
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        chunk = slice(start, start + chunk_size)
        # (chunk, vocab); the division the same bits as token_logprobs_and_entropy's
        chunk_logprobs = buffers.log_softmax(linear(h, weight), temperature)
        logprobs[chunk] = chunk_logprobs.gather(1, t.unsqueeze(1)).squeeze(1)
        probs = None
        if entropies is not None:
            probs = chunk_logprobs.exp()
            entropies[chunk] = -(probs * chunk_logprobs).sum(dim=-1)
        if products is not None:
            probs = chunk_logprobs.exp_() if probs is None else probs  # softmax (in place if not kept for entropy)
            probs[torch.arange(t.numel(), device=t.device), t] -= 1
            products[chunk] = linear(buffers.cast(probs, h.dtype), weight.T)  # probs @ weight
    return logprobs, entropies, products


def perplexity(mean_cross_entropy: float) -> float:
    return math.exp(mean_cross_entropy) if mean_cross_entropy < 700 else math.inf  # math.exp overflows past ~709

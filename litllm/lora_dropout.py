"""LoRA dropout: masks drawn fast on CPU (the gaps between dropped elements, or four 16-bit draws per 64-bit one),
kept for backward as the dropped positions, and drawn once per input tensor that several layers read (SharedDraw)."""
from __future__ import annotations

import math
import weakref

import torch


def lora_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) with dropout_mask's masks: x * mask / kept_fraction(p, x.device)."""
    return x * keep_mask(x, p) / kept_fraction(p, x.device)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A new dropout mask shaped as x (see dropout_mask), as 0/1 bytes: the same memory as bool, but a float tensor
    times a uint8 one runs vectorized on CPU and times a bool one does not (x * mask of 1024 x 576 floats: ~100 vs
    ~290 us on a 2-core AMD EPYC)."""
    return dropout_mask(torch.empty(x.shape, dtype=torch.bool, device=x.device), p).view(torch.uint8)


GAPS_MAX_P = 0.1  # up to this dropout probability dropout_mask draws the gaps between dropped elements on CPU


def kept_fraction(p: float, device: torch.device) -> float:
    """The probability that dropout_mask keeps an element on `device`: 1 - p, where p is drawn by thresholds (above
    GAPS_MAX_P, or off CPU) to the nearest multiple of 1/65536."""
    if p <= GAPS_MAX_P and torch.device(device).type == "cpu":
        return 1 - p
    return 1 - round(p * 65536) / 65536


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A new bool tensor shaped as `like`, True where dropout with probability `p` keeps an element: each independently
    with probability kept_fraction(p, like.device), from the global generator. The masks follow the same distribution
    as nn.Dropout's (PEFT's), not the same random stream: the same seed gives other masks than PEFT's. nn.Dropout's
    bernoulli_ makes one generator call per element (~7 ns on a 2-core CPU), which made dropout 0.05 cost a fifth of a
    LoRA step (benchmarks/RESULTS.md); here:

    - up to GAPS_MAX_P on CPU, the dropped positions (dropped_positions): one draw per dropped element, ~p of them;
    - otherwise each 64-bit draw makes four uniform 16-bit numbers, each compared with p's threshold: ~1 ns per element
      on a 2-core CPU.

    Under torch.compile the draws run outside the compiled graphs (lora.draw_block_dropout): traced, a draw into an
    empty tensor was miscompiled in training graphs on CPU (torch 2.13: inductor fused the reader, x * mask, into a
    kernel that ran before the draw, and adapters fed by a norm silently stopped learning)."""
    n = like.numel()
    if p <= GAPS_MAX_P and like.device.type == "cpu":
        keep = torch.ones(n, dtype=torch.bool)
        return keep.index_fill_(0, dropped_positions(n, p), False).view(like.shape)
    bits = torch.empty(-(-n // 4), dtype=torch.int64, device=like.device).random_(-2**63, None)  # 64 random bits each
    return bits.view(torch.int16)[:n].view(like.shape) >= -32768 + round(p * 65536)


def dropped_positions(n: int, p: float, draws: int | None = None) -> torch.Tensor:
    """The positions among n that dropout with probability p drops, increasing (int64, on CPU): the elements are
    dropped independently, so the number kept before the first drop and between two drops is geometric, P(k) =
    (1 - p)^k p, drawn as floor(log(u) / log(1 - p)) for u uniform in (0, 1] from 32 random bits (each probability
    within 2^-32 of the exact one; half the generator's work of 53 bits). For p = 0.05, ~p n draws where the
    thresholds take n / 4, and float64 arithmetic on them: a mask of 1024 x 576 in ~0.2 ms against ~0.55, of
    1024 x 1536 in ~0.4 against ~1.7 (2-core Intel Xeon). `draws` at a time (default: enough for all but about one
    call in a billion; rounded up to even), then more from where they stopped: the same positions from the same
    seed."""
    if p == 0:
        return torch.empty(0, dtype=torch.int64)
    found, start = [torch.empty(0, dtype=torch.float64)], 0.0  # start: the position after the last one drawn
    while start < n:
        count = 2 * -(-(draws or int(n * p + 6 * math.sqrt(n * p) + 16)) // 2)  # whole 64-bit draws
        bits = torch.empty(count // 2, dtype=torch.int64).random_(-2**63, None)  # two 32-bit draws each
        runs = bits.view(torch.int32).double().add_(2**31 + 1).mul_(2.0**-32)  # uniform in (0, 1]
        runs = runs.log_().div_(math.log1p(-p)).floor_().add_(1)  # kept elements before each drop, and the drop
        positions = runs.cumsum_(0).add_(start - 1)
        found.append(positions[:int(torch.searchsorted(positions, float(n)))])
        start = float(positions[-1]) + 1
    return (found[1] if len(found) == 2 else torch.cat(found)).long()


def draw_drops(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """What dropout with probability p drops from x, in the form LowRank keeps for backward: None at p = 0; on CPU up
    to GAPS_MAX_P, the positions of the dropped elements in x flattened (dropped_positions: ~p of them, 8 bytes each,
    0.4 bytes per element of x at p = 0.05 against a mask's one); else keep_mask's mask. Either way dropout_mask's
    draw: the same elements dropped from the same seed."""
    if p == 0:
        return None
    if p <= GAPS_MAX_P and x.device.type == "cpu":
        return dropped_positions(x.numel(), p)
    return keep_mask(x, p)


class SharedDraw:
    """Dropout drawn once per input tensor: the layers that read the same tensor one after another in a forward, q, k
    and v (the block's normed input) and gate and up (the other one), drop the same elements of it, and use one
    dropped copy of it, made once in forward and once in backward. As LitGPT's LoRA for its fused q/k/v layer drops
    one mask for the three; PEFT draws one per layer (the same distribution per layer, other correlations between q,
    k and v; the adapters are the same either way). A layer that comes back to the same input draws anew: a second
    forward on the same tensor is a new draw. One training forward/backward at a time per process."""

    def __init__(self) -> None:
        self.source: tuple | None = None  # (a weak reference to x, x's version, p)
        self.drops: torch.Tensor | None = None
        self.users: set[int] = set()  # the layers (their A weight's id) that have taken the draw
        self.copy_of: tuple | None = None  # (a weak reference to the drops, the dropped copy) made last

    def drops_for(self, x: torch.Tensor, p: float, layer: torch.Tensor) -> torch.Tensor | None:
        """The drops (draw_drops's) for the layer whose A weight is `layer` reading x: the draw the last layer that
        read this x took, or a new one. At p = 0 nothing, traceably: a compiled block without dropout calls nothing
        that is compiler-disabled (with dropout, its layers take masks drawn ahead: lora.draw_block_dropout)."""
        return None if p == 0 else self._drops_for(x, p, layer)

    @torch.compiler.disable  # run as is under torch.compile: the same draws as eager's
    def _drops_for(self, x: torch.Tensor, p: float, layer: torch.Tensor) -> torch.Tensor | None:
        # the layer by its id taken here, out of the compiled graph: there torch.compile would guard on the object's
        # identity and compile the forward again for each layer
        source, layer = (x._version, p), id(layer)
        if self.source is None or self.source[0]() is not x or self.source[1:] != source or layer in self.users:
            self.source, self.drops, self.users = (weakref.ref(x), *source), draw_drops(x, p), set()
        self.users.add(layer)
        return self.drops

    def dropped(self, x: torch.Tensor, drops: torch.Tensor | None) -> torch.Tensor:
        """without_drops(x, drops), the copy made last reused while it is of these drops."""
        if drops is None:
            return x
        if torch.compiler.is_compiling():  # a mask drawn ahead (lora.draw_block_dropout), in the graph
            return without_drops(x, drops)
        return self._dropped(x, drops)

    @torch.compiler.disable
    def _dropped(self, x: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
        if self.copy_of is None or self.copy_of[0]() is not drops:
            self.copy_of = (weakref.ref(drops), without_drops(x, drops))
        return self.copy_of[1]


SHARED_DRAW = SharedDraw()


def without_drops(x: torch.Tensor, drops: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """x with the elements `drops` (draw_drops's) names set to zero: in a copy, or in x itself (contiguous). Positions
    are written with put_: a copy and its zeroing at 1024 x 576 float32 (p = 0.05) ~95 us with x not in cache, against
    ~215 with index_fill_, and ~150 for a product with a mask, which is cast to x's dtype first."""
    if drops is None:
        return x
    if drops.dtype == torch.uint8:  # a mask shaped as x
        return x.mul_(drops.view(x.shape)) if in_place else x * drops.view(x.shape)
    out = x if in_place else x.clone(memory_format=torch.contiguous_format)
    out.view(-1).put_(drops, out.new_zeros(drops.shape))
    return out


def add_without_drops(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, drops: torch.Tensor | None) -> torch.Tensor:
    """out (2-d, contiguous) += without_drops(a @ b, drops), in place. With dropped positions the product adds into out
    itself (addmm_) and out's own values are put back at the dropped positions: a gather and a scatter of ~p of the
    elements, where a separate product would take a tensor of out's size, its zeroing and a pass to add it."""
    if drops is None:
        return out.addmm_(a, b)
    if drops.dtype == torch.uint8:  # a mask shaped as out
        return out.add_(without_drops(a @ b, drops, in_place=True))
    kept = out.view(-1).take(drops)
    return out.addmm_(a, b).view(-1).put_(drops, kept).view(out.shape)

"""What a run can ask of the blocks beyond h_l: per-head writes, attention and MLP writes,
attention patterns, and attention scaled at chosen (query, key) pairs.

``ResidualModel.run(record=..., scale=...)`` hands each block a :class:`Probe` in
``stream.extra["probe"]``; models that implement it (``supports_probe``) fill ``probe.out``:

- ``"patterns"``: the attention weights [B, H, T, T] (after any scaling; rows sum to 1 unless
  the scaling is post-softmax without renormalisation);
- ``"heads"``: each head's write to the residual stream [B, T, H, D], i.e. the head's output
  times its slice of the output projection, and ``"attn_bias"`` [D], the projection's bias (zeros
  when it has none), so ``heads.sum(2) + attn_bias`` is the attention write;
- ``"writes"``: ``"attn"`` and ``"mlp"`` [B, T, D], the attention and MLP writes of the block,
  which add up to the block's update h_{l+1} - h_l (in eval mode: dropout would break the sums).

With ``Probe.at`` ([B] positions) every record keeps only those query positions: writes
[B, (H,) D], patterns [B, H, T].

Scaling (:class:`AttentionScale`) multiplies the attention of the chosen (query, key) pairs by
``alpha`` in the chosen layers and heads. Modes:

- ``pre``: ``alpha`` multiplies the unnormalised weight exp(score), i.e. ``log(alpha)`` is added to
  the score before the softmax, which renormalises the row. ``alpha = 0`` is the knockout.
- ``post``: the softmax weights are multiplied by ``alpha`` and the row is **not** renormalised
  (it no longer sums to 1): the key's contribution alone is scaled, the others are untouched.
  ``alpha = 0`` zeroes the key's value in the head output (the narrow-gate paper's knockout).
- ``post_renorm``: multiplied after the softmax, then each row is renormalised to sum to 1. This
  equals ``pre`` exactly (kept as a name for readers of papers that describe it so).

Whatever the pairs say, a query's attention to itself is never scaled (as with knockouts, so no
row can be emptied). The fast attention path (SDPA) is used whenever nothing is requested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lab.errors import LabError

RECORDS = ("patterns", "heads", "writes")
SCALE_MODES = ("pre", "post", "post_renorm")


def require_probe(model, who: str) -> None:
    """One-line error for models whose blocks cannot honour a probe."""
    if not getattr(model, "supports_probe", False):
        raise LabError(f"{who} needs a model that records attention and MLP writes (the lab's Backbone, image "
                       f"models built on it, or model=hf); {type(model).__name__} does not")


def check_records(record: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(record)
    unknown = sorted(chosen - set(RECORDS))
    if unknown:
        raise LabError(f"unknown record(s) {unknown}; choose from {list(RECORDS)}")
    return chosen


@dataclass
class AttentionScale:
    """Scale attention at ``pairs`` ([B, T, T] bool: query, key) by ``alpha``.

    ``heads``: ``None`` scales every head of every layer; ``{layer: None}`` every head of that
    layer; ``{layer: [head, ...]}`` only those heads. ``mode``: see the module docstring.
    """

    pairs: Tensor
    alpha: float
    mode: str = "post"
    heads: Mapping[int, Sequence[int] | None] | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCALE_MODES:
            raise LabError(f"attention scaling mode must be one of {list(SCALE_MODES)}, got {self.mode!r}")
        if not self.alpha >= 0:
            raise LabError(f"attention scaling alpha must be >= 0, got {self.alpha}")
        self.alpha = float(self.alpha)

    def applies(self, layer: int) -> bool:
        return self.heads is None or layer in self.heads

    def mask(self, layer: int, n_heads: int) -> Tensor:
        """[B, H, T, T] bool: where this layer's weights are scaled (never on the diagonal)."""
        B, T, _ = self.pairs.shape
        eye = torch.eye(T, dtype=torch.bool, device=self.pairs.device)
        pairs = (self.pairs & ~eye)[:, None]
        chosen = None if self.heads is None else self.heads.get(layer)
        if chosen is None:
            return pairs.expand(B, n_heads, T, T)
        heads = torch.zeros(n_heads, dtype=torch.bool, device=pairs.device)
        for head in chosen:
            if not 0 <= int(head) < n_heads:
                raise LabError(f"layer {layer} has heads 0..{n_heads - 1}; head {head} does not exist")
            heads[int(head)] = True
        return pairs & heads[None, :, None, None]


@dataclass
class Probe:
    """One block's requests (``record``, ``scale``) and what the block recorded (``out``)."""

    layer: int
    record: frozenset = frozenset()
    scale: AttentionScale | None = None
    at: Tensor | None = None          # [B] query positions to keep in the records (None: all)
    out: dict = field(default_factory=dict)

    @property
    def slow(self) -> bool:
        """Does attention need its weights computed explicitly?"""
        return "patterns" in self.record or self.scale is not None

    def rows(self, x: Tensor) -> Tensor:
        """``x`` [B, T, ...] at the kept positions ([B, ...]), or whole."""
        return x if self.at is None else x[torch.arange(x.shape[0], device=x.device), self.at.to(x.device)]

    def keep_patterns(self, weights: Tensor) -> None:
        if "patterns" in self.record:
            self.out["patterns"] = weights if self.at is None else self.rows(weights.transpose(1, 2))

    def keep_heads(self, head_out: Tensor, weight: Tensor, bias: Tensor | None, conv1d: bool = False) -> None:
        """Per-head writes from the head outputs [B, T, H, hd] and the output projection."""
        if "heads" in self.record:
            self.out["heads"] = head_writes(self.rows(head_out), weight, conv1d)
            D = weight.shape[1] if conv1d else weight.shape[0]
            self.out["attn_bias"] = bias if bias is not None else weight.new_zeros(D)

    def keep_writes(self, attn: Tensor, mlp: Tensor) -> None:
        if "writes" in self.record:
            self.out["attn"], self.out["mlp"] = self.rows(attn), self.rows(mlp)


def head_writes(head_out: Tensor, weight: Tensor, conv1d: bool = False) -> Tensor:
    """[..., H, D]: head h's output [..., H, hd] through its slice of the output projection
    (``nn.Linear`` weight [D, H * hd]; GPT-2's ``Conv1D`` weight [H * hd, D] with ``conv1d``)."""
    H, hd = head_out.shape[-2:]
    w = weight.view(H, hd, -1) if conv1d else weight.t().reshape(H, hd, -1)
    return torch.einsum("...hc,hcd->...hd", head_out, w.to(head_out.dtype))


def scaled_softmax(scores: Tensor, scale: AttentionScale | None, layer: int) -> Tensor:
    """Softmax over keys of masked scores [B, H, T, T] (-inf or a large negative where masked),
    with ``scale`` applied as its mode says; computed in at least float32."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(dtype)
    if scale is None:
        return scores.softmax(-1)
    where = scale.mask(layer, scores.shape[1])
    if scale.mode == "pre":
        shift = math.log(scale.alpha) if scale.alpha > 0 else float("-inf")
        return torch.where(where, scores + shift, scores).softmax(-1)
    weights = scores.softmax(-1)
    weights = torch.where(where, weights * scale.alpha, weights)
    if scale.mode == "post_renorm":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights

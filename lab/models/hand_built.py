"""Setting a :class:`~lab.models.backbone.Backbone`'s weights by hand, so that known-answer toys
run the lab's real attention, MLP and norm code.

The residual stream holds named feature blocks ``u`` (F features) coded as ``x = [u, -u]``
(D = 2F): every vector has zero mean, so a LayerNorm only rescales it, by ``sqrt(F) / |u|``. A
large constant ``carrier`` feature on every token keeps ``|u|`` nearly the same everywhere, so the
norms act as one known scale ``n0 = sqrt(F) / carrier`` (to a fraction of a percent), and weights
can be written in units of the features. Heads: with ``n_heads = 2`` each head's query, key and
value spaces have F dimensions, indexed like the features.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lab.models.backbone import Backbone


class SignedLayout:
    """Named feature blocks (name -> width) of a [u, -u] coded residual stream."""

    def __init__(self, carrier: float, **widths: int) -> None:
        self.slices, start = {}, 0
        for name, width in {"carrier": 1, **widths}.items():
            self.slices[name] = slice(start, start + int(width))
            start += int(width)
        self.F, self.D, self.carrier = start, 2 * start, float(carrier)
        self.n0 = math.sqrt(self.F) / self.carrier   # what a LayerNorm multiplies features by

    def at(self, name: str, i: int = 0) -> int:
        """Feature index of element ``i`` of block ``name``."""
        s = self.slices[name]
        if not 0 <= i < s.stop - s.start:
            raise IndexError(f"{name}[{i}]")
        return s.start + i

    def code(self, u: Tensor) -> Tensor:
        """[..., F] features -> [..., D] stream vectors."""
        return torch.cat([u, -u], dim=-1)

    def reader(self, M: Tensor) -> Tensor:
        """A weight [out, D] applying ``M`` [out, F] to the features of a stream vector."""
        return torch.cat([M, torch.zeros_like(M)], dim=-1)

    def writer(self, N: Tensor) -> Tensor:
        """A weight [D, in] writing ``N`` [F, in] times its input as features."""
        return torch.cat([N, -N], dim=0)

    def zeros(self, rows: int | None = None) -> Tensor:
        return torch.zeros(self.F) if rows is None else torch.zeros(rows, self.F)


@torch.no_grad()
def zero_weights(model: Backbone) -> Backbone:
    """Every block, embedding and readout weight of ``model`` set to zero, LayerNorms to weight 1,
    bias 0; in eval mode. Build the backbone with ``d_model = layout.D`` and ``n_heads = 2``."""
    for name, p in model.named_parameters():
        if ".ln" in name or name.startswith("ln_f"):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.zero_()
    return model.eval()


def score_gain(layout: SignedLayout, score: float, query_value: float = 1.0) -> float:
    """Query gain that gives attention score ``score`` (after SDPA's 1/sqrt(head dim)) between a
    query feature of raw value ``query_value`` and a key feature of raw value 1 read with gain
    ``1 / n0`` (so the key, after the norm, holds its raw value)."""
    return score * math.sqrt(layout.F) / (layout.n0 * query_value)


@torch.no_grad()
def set_head(model: Backbone, layout: SignedLayout, layer: int, head: int, *, q: Tensor | None = None,
             k: Tensor | None = None, v: Tensor | None = None, o: Tensor | None = None) -> None:
    """Head ``head`` of block ``layer``: ``q``/``k``/``v`` [F, F] map features (after the norm) into
    the head's space, ``o`` [F, F] maps the head's space back into features (a residual write)."""
    attn, D, F = model.blocks[layer].attn, layout.D, layout.F
    for offset, M in ((0, q), (D, k), (2 * D, v)):
        if M is not None:
            attn.qkv.weight[offset + head * F: offset + (head + 1) * F] = layout.reader(M)
    if o is not None:
        attn.proj.weight[:, head * F: (head + 1) * F] = layout.writer(o)


@torch.no_grad()
def set_mlp(model: Backbone, layout: SignedLayout, layer: int, w_in: Tensor, b_in: Tensor, w_out: Tensor) -> None:
    """MLP of block ``layer``: hidden = GELU(w_in [d_ff, F] features + b_in), write w_out [F, d_ff] hidden."""
    mlp = model.blocks[layer].mlp
    mlp[0].weight[:] = layout.reader(w_in)
    mlp[0].bias[:] = b_in
    mlp[2].weight[:] = layout.writer(w_out)

"""The readout with the final norm's scale frozen: logit contributions that add up.

``readout(h) = W_U norm(h) + b``. A LayerNorm is ``gamma * (h - mean h) / sigma(h) + beta``, an
RMSNorm ``gamma * h / rms(h)``. Freezing sigma (or rms) at the value of a given final stream
h_L makes the map linear in h, so when h_L = h_0 + sum of block writes, the logits split exactly
into one contribution per write plus a constant (``beta`` and ``b`` through ``W_U``). This is the
standard direct-logit-attribution approximation: a component's contribution is read at the final
stream's scale, not at the scale it would have alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lab.errors import LabError


@dataclass
class FrozenReadout:
    """Linear readout at a frozen norm scale; see the module docstring."""

    W: Tensor                  # [V, D] unembedding, times gamma
    inv_scale: Tensor          # [N, 1]: 1 / sigma (or 1 / rms) of each final stream
    centred: bool              # LayerNorm (subtract the mean) or RMSNorm
    offset: Tensor             # [V] logits of the constant terms (beta through W_U, plus b)

    def __call__(self, x: Tensor) -> Tensor:
        """Logit contributions [N, ..., V] of component vectors ``x`` [N, ..., D]."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        scale = self.inv_scale.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (x * scale) @ self.W.t().to(x.dtype)

    def difference(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """Contribution [N, ...] of ``x`` [N, ..., D] to logit(a) - logit(b), per row (a, b: [N] ids)."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        d = (self.W[a] - self.W[b]).to(x.dtype) * self.inv_scale.to(x.dtype)   # [N, D]
        return torch.einsum("n...d,nd->n...", x, d)


def _norm_kind(norm: nn.Module | None) -> tuple[bool, float, Tensor | None, Tensor | None]:
    if norm is None:
        return False, 0.0, None, None
    name = type(norm).__name__
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if isinstance(norm, nn.LayerNorm) or name.endswith("LayerNorm"):
        return True, float(eps if eps is not None else 1e-5), getattr(norm, "weight", None), getattr(norm, "bias", None)
    if name.endswith("RMSNorm"):
        return False, float(eps if eps is not None else 1e-6), getattr(norm, "weight", None), None
    raise LabError(f"direct logit attribution needs a LayerNorm or RMSNorm before the readout; {name} is neither")


def frozen_readout(model, h_final: Tensor) -> FrozenReadout:
    """The readout of ``model`` linearised at the final streams ``h_final`` [N, D]."""
    norm, W, bias = model.readout_parts()
    centred, eps, gamma, beta = _norm_kind(norm)
    h = h_final if h_final.dtype in (torch.float32, torch.float64) else h_final.float()
    if norm is None:
        inv = h.new_ones(h.shape[0], 1)
    elif centred:
        inv = (h.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    else:
        inv = (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    W_eff = W * gamma.to(W.dtype)[None] if gamma is not None else W
    offset = W.new_zeros(W.shape[0])
    if beta is not None:
        offset = offset + W @ beta.to(W.dtype)
    if bias is not None:
        offset = offset + bias
    return FrozenReadout(W=W_eff, inv_scale=inv, centred=centred, offset=offset)

"""Decoder-only pre-LN transformer that implements the residual-stream interface natively."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.errors import LabError
from lab.models.interface import ResidualModel, Stream, attention_mask
from lab.models.probe import scaled_softmax

POSITIONAL_ENCODINGS = ("rope", "learned", "none")
INITS = ("gpt2", "torch", "scaled")
TOKEN_SHIFTS = (False, True, "associations")


class ModelConfigError(LabError, ValueError):
    """A model setting that cannot build a model."""


def rope_cache(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, 1, T, head_dim/2] for rotary embeddings at the given positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope = n_heads, d_model // n_heads, rope
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            cos, sin = stream.extra["rope"]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = stream.extra.get("mask")
        if mask is None or stream.knockout is not None:
            mask = attention_mask(stream)
        patterns, probe = stream.extra.get("patterns"), stream.extra.get("probe")
        if patterns is not None or (probe is not None and probe.slow):
            # the slow path, on request: every head's attention weights (and any scaling of them)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            weights = scaled_softmax(scores.masked_fill(~mask, float("-inf")), probe and probe.scale,
                                     probe.layer if probe else 0).to(v.dtype)
            if patterns is not None:
                patterns.append(weights)
            if probe is not None:
                probe.keep_patterns(weights)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )
        out = out.transpose(1, 2)  # [B, T, H, hd]
        if probe is not None:
            probe.keep_heads(out, self.proj.weight, self.proj.bias)
        return self.proj(out.reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, rope: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, rope)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, stream: Stream) -> Tensor:
        h = stream.h
        attn = self.drop(self.attn(self.ln1(h), stream))
        h = h + attn
        mlp = self.drop(self.mlp(self.ln2(h)))
        probe = stream.extra.get("probe")
        if probe is not None:
            probe.keep_writes(attn, mlp)
        return h + mlp


def previous_attendable(attend: Tensor) -> Tensor:
    """Index [B, T] of the nearest earlier attendable position (-1 where there is none), so that
    a token shift skips noise and padding the way attention does."""
    T = attend.shape[1]
    index = torch.arange(T, device=attend.device).expand_as(attend)
    marked = torch.where(attend, index, torch.full_like(index, -1))
    return torch.cat([torch.full_like(marked[:, :1], -1), marked[:, :-1].cummax(dim=1).values], dim=1)


def shift_gate(batch: Mapping[str, Tensor], previous: Tensor, where: bool | str) -> Tensor:
    """[B, T] bool: positions that receive the token shift. ``True``: every position with an
    attendable predecessor; ``"associations"``: only those at or after the first ``[CTX_END]``."""
    gate = previous >= 0
    if where != "associations":
        return gate
    roles = batch.get("roles") or {}
    if "ctx_end" not in roles:
        raise ModelConfigError(
            "model.token_shift=associations needs the batch's ctx_end role (a task with a [CTX_END] "
            "segment, such as task=retrieval); use model.token_shift=true or false for this task"
        )
    start = roles["ctx_end"][:, :1]
    index = torch.arange(previous.shape[1], device=previous.device)[None]
    return gate & (index >= start) & (start >= 0)


def initialise(model: nn.Module, init: str, n_layers: int) -> None:
    """Initialise every weight of ``model`` by the named scheme (see :class:`Backbone`)."""
    if init == "torch":
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return
    if init == "gpt2":  # kept draw for draw as before the option existed (same seed, same weights)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in model.named_parameters():  # GPT-2 style scaled init of residual writes
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.Linear):
            write = name.endswith("proj") or name.endswith("mlp.2")
            std = module.in_features ** -0.5 / (math.sqrt(2 * n_layers) if write else 1.0)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _default_shift_scale(state_dict, prefix, *args) -> None:
    """Checkpoints written before the shift could fade have no ``shift_scale``: it was 1."""
    state_dict.setdefault(prefix + "shift_scale", torch.ones(()))


class Backbone(ResidualModel):
    """The lab's transformer (it records per-head writes, patterns and scales attention on
    request: :mod:`lab.models.probe`). ``embed`` also accepts precomputed input embeddings for
    placeholder tokens (``embed(batch, inject=(values, mask))``),
    which is how projected image tokens enter the residual stream.

    ``token_shift=True`` adds a previous-token prior: h_0 at position t also receives a learned
    linear map of the input embedding at the previous attendable position (a "token shift", as in
    RWKV), which hands every token the identity of its predecessor without an attention step.
    ``token_shift="associations"`` applies it only from the prompt's first ``[CTX_END]`` on (read
    from ``batch.roles["ctx_end"]``): association items know their shape, but context shapes do not
    know their colour, so colour-shape binding is left to attention. The shift's output is scaled
    by the buffer ``shift_scale`` (1 unless a training fade lowers it; saved in checkpoints).
    It is an architectural prior, off by default; docs/learning.md measures what it changes.

    ``init`` chooses the initialisation (docs/learning.md measures each):
    ``gpt2``: every weight N(0, 0.02), residual writes N(0, 0.02 / sqrt(2 L)) (GPT-2's choice for
    width 768; at width 64-128 it leaves attention near uniform);
    ``torch``: PyTorch's own defaults (embeddings N(0, 1), linear layers uniform with std
    1 / sqrt(3 fan_in), LayerNorm ones/zeros);
    ``scaled``: linear weights N(0, 1 / fan_in) (std 1 / sqrt(fan_in)), residual writes also divided
    by sqrt(2 L), biases zero, embeddings N(0, 1).
    """

    supports_probe = True

    def __init__(
        self,
        vocab_size: int,
        n_layers: int = 4,
        d_model: int = 128,
        n_heads: int = 4,
        d_ff: int = 512,
        max_len: int = 512,
        pos_encoding: str = "rope",
        dropout: float = 0.0,
        token_shift: bool | str = False,
        init: str = "gpt2",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ModelConfigError(f"model.init={init!r} is unknown; choose one of {INITS}")
        if token_shift not in TOKEN_SHIFTS or isinstance(token_shift, int) and not isinstance(token_shift, bool):
            raise ModelConfigError(
                f"model.token_shift={token_shift!r} is unknown; choose false, true or associations"
            )
        if pos_encoding not in POSITIONAL_ENCODINGS:
            raise ModelConfigError(
                f"model.pos_encoding={pos_encoding!r} is unknown; choose one of {POSITIONAL_ENCODINGS}"
            )
        if d_model % n_heads or (pos_encoding == "rope" and (d_model // n_heads) % 2):
            raise ModelConfigError(
                f"model.d_model={d_model} must be divisible by model.n_heads={n_heads} "
                "(with an even head size for RoPE)"
            )
        if min(n_layers, d_model, n_heads, d_ff, max_len) < 1 or not 0.0 <= dropout < 1.0:
            raise ModelConfigError("model sizes must be >= 1 and model.dropout in [0, 1)")
        self.n_layers, self.d_model, self.max_len, self.pos_encoding = n_layers, d_model, max_len, pos_encoding
        self.token_shift = token_shift
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.shift = nn.Linear(d_model, d_model, bias=False) if token_shift else None
        if self.shift is not None:
            self.register_buffer("shift_scale", torch.ones(()))
            self._register_load_state_dict_pre_hook(_default_shift_scale)
        self.pos_emb = nn.Embedding(max_len, d_model) if pos_encoding == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, pos_encoding == "rope") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        initialise(self, init, n_layers)

    def embed(self, batch: Mapping[str, Tensor], inject: tuple[Tensor, Tensor] | None = None) -> Stream:
        """Token embeddings (+ token shift, + positions). ``inject`` = (values [B, P, D], mask
        [B, T] bool) writes externally computed vectors (e.g. image tokens) at the masked positions."""
        tokens = batch["tokens"]
        B, T = tokens.shape
        if T > self.max_len:
            raise ModelConfigError(f"sequence of length {T} exceeds model.max_len={self.max_len}")
        h = self.tok_emb(tokens)
        if inject is not None:
            values, mask = inject
            h = h.masked_scatter(mask[..., None], values.to(h.dtype))
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        if self.shift is not None:
            previous = previous_attendable(batch["attend"])
            h_prev = h.gather(1, previous.clamp(min=0)[..., None].expand_as(h))
            gate = shift_gate(batch, previous, self.token_shift)
            h = h + self.shift_scale * self.shift(h_prev * gate[..., None].to(h.dtype))
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions)
        stream = Stream(h=self.drop(h), attend=batch["attend"], positions=positions)
        stream.extra["mask"] = attention_mask(stream)
        if self.pos_encoding == "rope":
            stream.extra["rope"] = rope_cache(positions, self.blocks[0].attn.head_dim)
        return stream

    def block(self, layer: int, stream: Stream) -> Tensor:
        return self.blocks[layer](stream)

    def readout(self, h: Tensor) -> Tensor:
        return self.head(self.ln_f(h))

    def token_embedding(self) -> Tensor:
        return self.tok_emb.weight

    def readout_parts(self) -> tuple[nn.Module, Tensor, None]:
        return self.ln_f, self.head.weight, None

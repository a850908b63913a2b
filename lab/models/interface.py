"""The residual-stream interface every evaluator is written against (docs/architecture.md).

A model exposes ``embed(batch) -> Stream``, ``block(l, stream) -> h_{l+1}`` and
``readout(h) -> logits``. :class:`ResidualModel` builds the shared primitives on top: skipping
blocks, capturing h_l, editing/patching h_l, starting from a cached h_l and knocking out attention
to chosen key positions. Subclasses only implement the three methods; models that can also
record per-head and MLP writes, attention patterns, or scale attention (:mod:`lab.models.probe`)
set ``supports_probe`` and read ``stream.extra["probe"]`` in their blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from lab.errors import LabError
from lab.models.probe import AttentionScale, Probe, check_records, require_probe

Edit = Callable[[Tensor], Tensor]


@dataclass
class Stream:
    """The residual stream h_l plus the state every block needs.

    ``attend`` marks key positions that may be attended to (False for padding and noise);
    ``knockout`` optionally marks (query, key) pairs whose attention is removed.
    """

    h: Tensor                      # [B, T, D]
    attend: Tensor                 # [B, T] bool
    positions: Tensor              # [B, T] long
    knockout: Tensor | None = None  # [B, T, T] bool (True = blocked) or None
    extra: dict = field(default_factory=dict)

    def with_h(self, h: Tensor) -> "Stream":
        return replace(self, h=h)


@dataclass
class RunOutput:
    logits: Tensor                         # [B, V] at ``positions`` if given, else [B, T, V]
    captured: dict[int, Tensor]            # layer -> h_l (full [B, T, D])
    stream: Stream                         # the final stream (h_L, after any edit at layer L)
    records: dict[int, dict] = field(default_factory=dict)  # layer -> what ``record`` asked for


def attention_mask(stream: Stream) -> Tensor:
    """Boolean [B, 1, T, T] mask (True = may attend): causal, attendable keys, minus knockouts.

    Every query may always attend to itself, so no row is empty (padding and noise tokens
    still produce finite values that no other token reads).
    """
    B, T = stream.attend.shape
    device = stream.attend.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = causal[None] & stream.attend[:, None, :]
    if stream.knockout is not None:
        mask = mask & ~stream.knockout
    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]
    return mask[:, None]


def knockout_keys(attend: Tensor, keys: Tensor, queries: Tensor | None = None) -> Tensor:
    """Build a [B, T, T] knockout mask blocking attention from ``queries`` (default: all) to ``keys``.

    ``keys``/``queries`` are [B, T] bool masks of positions.
    """
    B, T = attend.shape
    q = torch.ones(B, T, dtype=torch.bool, device=attend.device) if queries is None else queries
    return q[:, :, None] & keys[:, None, :]


class ResidualModel(nn.Module):
    """Base class: a stack of blocks over a residual stream, with the shared primitives."""

    n_layers: int
    supports_probe: bool = False   # blocks honour stream.extra["probe"] (lab.models.probe)

    def embed(self, batch: Mapping[str, Tensor]) -> Stream:  # pragma: no cover - abstract
        raise NotImplementedError

    def block(self, layer: int, stream: Stream) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def readout(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_embedding(self) -> Tensor | None:
        """The input token embedding matrix [V, D], or None if the model has none to offer."""
        return None

    def readout_parts(self) -> tuple[nn.Module | None, Tensor, Tensor | None]:
        """(final norm, unembedding [V, D], readout bias [V] or None): ``readout(h)`` is
        ``norm(h) @ W.T + bias``. Needed by direct logit attribution."""
        raise LabError(f"{type(self).__name__} does not expose its final norm and unembedding")

    # ------------------------------------------------------------------ primitives
    def run(
        self,
        batch: Mapping[str, Tensor] | None = None,
        *,
        stream: Stream | None = None,
        start: int = 0,
        stop: int | None = None,
        skip: Iterable[int] = (),
        capture: Iterable[int] = (),
        edits: Mapping[int, Edit] | None = None,
        positions: Tensor | None = None,
        knockout: Tensor | None = None,
        knockout_layers: Iterable[int] | None = None,
        record: Iterable[str] = (),
        record_at: Tensor | None = None,
        scale: AttentionScale | None = None,
    ) -> RunOutput:
        """Run blocks ``start..stop-1`` over the residual stream and read out.

        - ``stream``/``start``: begin from a cached h_start instead of embedding ``batch``.
        - ``skip``: blocks to remove (the residual passes through unchanged).
        - ``capture``: layers l (0..L) whose h_l is returned, as seen by block l (after edits).
        - ``edits``: {l: fn(h_l) -> h_l'} applied before block l (l = L edits the final stream).
        - ``positions``: [B] index per sample; read out only there (logits [B, V]); or a [B, T]
          bool mask: read out at its True positions, row-major (logits [N, V]).
        - ``knockout`` [B, T, T] bool blocks attention pairs in ``knockout_layers`` (default all).
        - ``stop``: last layer to reach (default L); with ``stop < L`` the logits are those of
          the readout applied to h_stop (a logit lens).
        - ``record``: any of ``patterns``, ``heads``, ``writes`` (:mod:`lab.models.probe`), returned
          per block in ``RunOutput.records``; ``record_at`` [B] keeps only those query positions.
        - ``scale``: an :class:`~lab.models.probe.AttentionScale` applied in the blocks it names.
        """
        if stream is None:
            if batch is None:
                raise ValueError("run() needs a batch or a cached stream")
            stream = self.embed(batch)
        stop = self.n_layers if stop is None else stop
        skip, capture, edits = set(skip), set(capture), dict(edits or {})
        ko_layers = None if knockout_layers is None else set(knockout_layers)
        record = check_records(record)
        if record or scale is not None:
            require_probe(self, "recording attention internals or scaling attention")
        captured: dict[int, Tensor] = {}
        records: dict[int, dict] = {}
        h = stream.h
        for layer in range(start, stop + 1):
            if layer in edits:
                h = edits[layer](h)
            if layer in capture:
                captured[layer] = h
            if layer == stop:
                break
            if layer in skip:
                continue
            ko = knockout if (knockout is not None and (ko_layers is None or layer in ko_layers)) else None
            state = replace(stream, h=h, knockout=ko if ko is not None else stream.knockout)
            layer_scale = scale if scale is not None and scale.applies(layer) else None
            if record or layer_scale is not None:
                probe = Probe(layer, record, layer_scale, record_at)
                state.extra = {**stream.extra, "probe": probe}
                if record:
                    records[layer] = probe.out
            h = self.block(layer, state)
        final = stream.with_h(h)
        if positions is not None and positions.dtype == torch.bool:
            h = h[positions]
        elif positions is not None:
            h = h[torch.arange(h.shape[0], device=h.device), positions]
        return RunOutput(logits=self.readout(h), captured=captured, stream=final, records=records)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Plain forward: logits [B, T, V]."""
        stream = self.embed(batch)
        h = stream.h
        for layer in range(self.n_layers):
            h = self.block(layer, stream.with_h(h))
        return self.readout(h)

    def answer_logits(self, batch: Mapping[str, Tensor], **kwargs) -> Tensor:
        """Logits [B, V] at each sample's answer position (``batch['answer_pos']``)."""
        return self.run(batch, positions=batch["answer_pos"], **kwargs).logits


def patch_positions(positions: Tensor, values: Tensor) -> Edit:
    """An edit that replaces h at one position per sample (``positions`` [B]) with ``values`` [B, D]."""

    def edit(h: Tensor) -> Tensor:
        h = h.clone()
        h[torch.arange(h.shape[0], device=h.device), positions] = values.to(h.dtype)
        return h

    return edit

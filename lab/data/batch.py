"""The batch every model, objective and evaluator reads: a typed dataclass, not a bag of keys.

Required: ``tokens``, ``attend``, ``labels`` (what to predict at each position, ``IGNORE_INDEX``
where nothing is), and the evaluated query (``answer_pos``, ``targets``, ``n_objects``).
Optional structure, present when the task provides it:

- ``roles``: token-role name -> [B, K] positions (-1 = none), the same names for text and image
  prompts (``tasks.protocol``: ``context_color``, ``association_item``, ``query``, ``image``...);
- ``objects``: per-object facts [B, N] (-1 = none): ``colors``, ``shapes``, ``items``,
  ``association_order``, ``query_object`` ([B]) and, for drawn contexts, ``corners`` [B, N, 2];
- ``mid_labels``: the intermediate variable (the queried object's shape token) at each query
  position, for the intermediate-supervision objective;
- ``one_hop_labels``: targets of the training-only one-hop queries (``task.one_hop_queries``), for
  the one-hop objective; kept out of ``labels`` so the answer loss never sees them;
- ``images`` [B, 3, H, W] or ``image_features`` [B, P, C]: the picture of an image prompt, or its
  encoder features (computed once for a frozen encoder).

Read-only mapping access (``batch["tokens"]``, ``"images" in batch``, ``batch.get(...)``) is kept
for code written against plain dict batches; ``in`` is true only for fields that are set.
Lightning moves the whole dataclass (nested dicts included) to the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of positions without a target (torch's cross-entropy default)


@dataclass
class Batch:
    tokens: Tensor                     # [B, T] token ids (padding: the vocabulary's pad id)
    attend: Tensor                     # [B, T] bool; False on padding and noise (never attended to)
    labels: Tensor                     # [B, T] token to predict at each position; IGNORE_INDEX elsewhere
    answer_pos: Tensor                 # [B] position of the evaluated query (the last prompt token)
    targets: Tensor                    # [B] its answer token
    n_objects: Tensor                  # [B]
    roles: dict[str, Tensor] = field(default_factory=dict)
    objects: dict[str, Tensor] = field(default_factory=dict)
    mid_labels: Tensor | None = None   # [B, T] intermediate-variable token at query positions
    one_hop_labels: Tensor | None = None  # [B, T] one-hop query targets (training only)
    images: Tensor | None = None
    image_features: Tensor | None = None

    # ---------------------------------------------------------------- read-only mapping access
    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._field_names() and getattr(self, key) is not None

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self else default

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> list[str]:
        return [name for name in self._field_names() if getattr(self, name) is not None]

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    # ------------------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def has_image(self) -> bool:
        return self.images is not None or self.image_features is not None

    def role_mask(self, *names: str) -> Tensor:
        """[B, T] bool: positions holding any of the named roles."""
        mask = torch.zeros_like(self.attend)
        for name in names:
            if name not in self.roles:
                raise KeyError(f"this batch has no token role {name!r}; it has {sorted(self.roles)}")
            positions = self.roles[name]
            rows = torch.arange(len(self), device=positions.device)[:, None].expand_as(positions)
            valid = positions >= 0
            mask[rows[valid], positions[valid]] = True
        return mask

    def rows(self, keep: Tensor) -> "Batch":
        """The samples selected by ``keep`` ([B] bool or indices), every per-sample field included."""
        return self._map(lambda t: t[keep.to(t.device)])

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> "Batch":
        """A copy with ``fn`` applied to every tensor, those in ``roles``/``objects`` included."""

        def apply(value):
            if isinstance(value, Tensor):
                return fn(value)
            if isinstance(value, dict):
                return {k: apply(v) for k, v in value.items()}
            return value

        return dataclasses.replace(self, **{f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)})


def padded(rows: list, fill: int = -1) -> Tensor:
    """[len(rows), longest, ...] long tensor of ragged rows, right-padded with ``fill``. Rows hold
    ints, or equal-length tuples (e.g. (row, col) corners) that become a trailing dimension."""
    width = max((len(r) for r in rows), default=0)
    first = next((r[0] for r in rows if len(r)), 0)
    pad = [fill] * len(first) if isinstance(first, (tuple, list)) else fill
    return torch.tensor([[*map(_as_list, r), *[pad] * (width - len(r))] for r in rows], dtype=torch.long)


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value

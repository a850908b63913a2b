"""Hand-built retrieval models whose binding mechanism is known: the known answers of the binding
evaluators (interventions, attention knockout, probes).

Both models solve the lab's retrieval task exactly (``colour -> shape -> item``) with hard
attention over a residual stream of named subspaces, and read only through the residual-stream
interface, so knockouts and patches act on them as on a trained model. They differ in how the
final token finds the queried object:

- ``mechanism="positional"``: block 0 looks the query colour up among the context colours and
  copies that object's **slot index** (its position in the context) into a register; block 1
  fetches the shape at that slot; block 2 fetches the item associated with that shape.
  Patching a counterfactual's final-token state after block 0 (h_1) makes the model retrieve
  "the object at slot k": the positional outcome. After block 1 (h_2) the register holds a
  shape: symbolic. After block 2 (h_3): answer copy.
- ``mechanism="symbolic"``: block 0 looks the query colour up among the context shapes' preceding
  colours and copies the **shape identity** into the register directly; block 1 does nothing;
  block 2 fetches the item. Patching h_1 or h_2 gives the symbolic outcome; no layer is positional.

Residual layout (V = vocabulary size, S = most objects): ``tok`` [V] one-hot token; ``prev`` [V]
the previous non-noise token (a token shift); ``slot`` [S] the object index of context tokens;
``reg_slot`` [S], ``reg_shape`` [V], ``answer`` [V] the registers the blocks write; ``in_context``
and ``in_associations`` flags. The embedding computes the slot index and flags from the token
sequence (an idealised positional code), so only the blocks move information between positions.

Evaluate it: ``python evaluate.py experiment=binding_toy`` (``model.mechanism=symbolic`` for the
other one); outputs in ``eval_out/binding_toy_<mechanism>``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lab.errors import LabError
from lab.models.interface import ResidualModel, Stream, attention_mask
from tasks.retrieval import RetrievalTask
from tasks.vocab import CTX_END, NOISE, QUE

MECHANISMS = ("positional", "symbolic")


class BindingToyModel(ResidualModel):
    """Three-block hand-built retrieval model with a known binding mechanism (module docstring)."""

    def __init__(self, task: RetrievalTask, mechanism: str = "positional", sharpness: float = 50.0,
                 logit_scale: float = 10.0) -> None:
        super().__init__()
        if mechanism not in MECHANISMS:
            raise LabError(f"binding toy mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self.task, self.mechanism = task, mechanism
        self.sharpness, self.logit_scale = float(sharpness), float(logit_scale)
        self.n_layers = 3
        V, S = len(task.vocab), task.max_objects
        self.vocab_size = V
        offsets = {}
        start = 0
        for name, width in (("tok", V), ("prev", V), ("slot", S), ("reg_slot", S), ("reg_shape", V),
                            ("answer", V), ("in_context", 1), ("in_associations", 1)):
            offsets[name] = slice(start, start + width)
            start += width
        self.parts, self.D = offsets, start
        self.source = f"binding_toy_{mechanism}"
        kinds = torch.zeros(3, V)
        kinds[0, task.color_token(0): task.color_token(task.n_colors - 1) + 1] = 1
        kinds[1, task.shape_token(0): task.shape_token(task.n_shapes - 1) + 1] = 1
        kinds[2, task.item_token(0): task.item_token(task.n_items - 1) + 1] = 1
        self.register_buffer("kinds", kinds)  # rows: is colour / shape / item token
        self.noise_id, self.ctx_end_id, self.que_id = (task.vocab[t] for t in (NOISE, CTX_END, QUE))

    def _part(self, h: Tensor, name: str) -> Tensor:
        return h[..., self.parts[name]]

    # ------------------------------------------------------------------ interface
    def embed(self, batch: Mapping[str, Tensor]) -> Stream:
        tokens = batch["tokens"]
        B, T = tokens.shape
        device = tokens.device
        V = self.vocab_size
        index = torch.arange(T, device=device).expand(B, T)
        h = torch.zeros(B, T, self.D, device=device)
        tok = torch.nn.functional.one_hot(tokens, V).float()
        h[..., self.parts["tok"]] = tok
        # Previous non-noise token (position 0 has none).
        real = tokens != self.noise_id
        last_real = torch.where(real, index, torch.full_like(index, -1)).cummax(dim=1).values
        prev_pos = torch.cat([torch.full((B, 1), -1, device=device, dtype=torch.long), last_real[:, :-1]], dim=1)
        prev = torch.nn.functional.one_hot(tokens.gather(1, prev_pos.clamp(min=0)), V).float()
        h[..., self.parts["prev"]] = prev * (prev_pos >= 0)[..., None]
        # Context = after BOS, before [CTX_END]; associations = after [CTX_END], before [QUE].
        ctx_end = (tokens == self.ctx_end_id).float().argmax(1, keepdim=True)
        que = (tokens == self.que_id).float().argmax(1, keepdim=True)
        in_context = (index > 0) & (index < ctx_end) & real
        in_associations = (index > ctx_end) & (index < que)
        h[..., self.parts["in_context"]] = in_context[..., None].float()
        h[..., self.parts["in_associations"]] = in_associations[..., None].float()
        # Slot of a context token: how many context colours came up to it, minus one.
        is_color = tok @ self.kinds[0]
        slot = (is_color * in_context).cumsum(1).long() - 1
        slot_code = torch.nn.functional.one_hot(slot.clamp(0, self.task.max_objects - 1), self.task.max_objects).float()
        h[..., self.parts["slot"]] = slot_code * (in_context & (slot >= 0))[..., None]
        attend = batch.get("attend", torch.ones(B, T, dtype=torch.bool, device=device))
        return Stream(h=h, attend=attend, positions=index)

    def block(self, layer: int, stream: Stream) -> Tensor:
        h = stream.h
        part = lambda name: self._part(h, name)  # noqa: E731
        is_shape, is_item = part("tok") @ self.kinds[1], part("tok") @ self.kinds[2]
        context_shape = (part("in_context")[..., 0] * is_shape)[..., None]
        association_item = (part("in_associations")[..., 0] * is_item)[..., None]
        update = torch.zeros_like(h)
        if layer == 0 and self.mechanism == "positional":
            # query colour -> the slot of the context colour equal to it
            keys = part("tok") * part("in_context")
            update[..., self.parts["reg_slot"]] = self._lookup(stream, part("tok"), keys, part("slot"))
        elif layer == 0:
            # query colour -> the context shape whose preceding token is that colour
            keys = part("prev") * context_shape
            update[..., self.parts["reg_shape"]] = self._lookup(stream, part("tok"), keys, part("tok"))
        elif layer == 1 and self.mechanism == "positional":
            # slot -> the context shape at that slot
            keys = part("slot") * context_shape
            update[..., self.parts["reg_shape"]] = self._lookup(stream, part("reg_slot"), keys, part("tok"))
        elif layer == 2:
            # shape -> the association item whose preceding token is that shape
            keys = part("prev") * association_item
            update[..., self.parts["answer"]] = self._lookup(stream, part("reg_shape"), keys, part("tok"))
        elif layer not in (0, 1, 2):
            raise IndexError(layer)
        return h + update

    def readout(self, h: Tensor) -> Tensor:
        return self.logit_scale * self._part(h, "answer")

    def _lookup(self, stream: Stream, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Hard attention: each position reads the values of the key matching its query, under
        the stream's mask (causal, attendable keys, knockouts)."""
        scores = self.sharpness * query @ keys.transpose(1, 2)
        scores = scores.masked_fill(~attention_mask(stream)[:, 0], float("-inf"))
        return torch.softmax(scores, dim=-1) @ values

"""Hand-built image models whose image information does, or does not, pass through one token:
the known answers of the narrow-gate evaluator.

Both are :class:`~lab.models.backbone.Backbone` s with hand-set weights (the lab's real attention
and norm code runs; :mod:`lab.models.hand_built`) over the prompts of :mod:`tasks.gate`
(``[BOS] [IMG] x P [CTX_END] [QUE]``, answer: the value one image token shows). Image tokens enter
as ``image_features`` written at the ``[IMG]`` positions, like a vision model's projected tokens.
Queries that look for nothing attend to ``[BOS]``, whose value is empty.

- ``mechanism="gate"``: block 0, head 0: ``[CTX_END]`` (the token after the image) attends to
  the image token showing the value and copies it into a ``gate`` register; block 1, head 0:
  ``[QUE]`` attends to ``[CTX_END]`` and copies the register into the ``answer`` register. All
  image information reaches the text through ``[CTX_END]``: a narrow gate.
- ``mechanism="direct"``: block 0 is idle; block 1, head 0: ``[QUE]`` attends to the image token
  showing the value and copies it into ``answer``. The text reads the patches directly.

Evaluate one: ``python evaluate.py experiment=gate_toy [model.mechanism=direct]``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lab.data.batch import Batch
from lab.data.text import collate_text
from lab.errors import LabError
from lab.models.backbone import Backbone
from lab.models.hand_built import SignedLayout, score_gain, set_head, zero_weights
from lab.models.interface import Stream
from tasks.gate import GateTask
from tasks.vocab import BOS, CTX_END, IMG, QUE

MECHANISMS = ("gate", "direct")


class GateToyModel(Backbone):
    """A hand-built image model with or without a narrow gate (module docstring)."""

    def __init__(self, task: GateTask | None = None, mechanism: str = "gate", logit_scale: float = 5.0,
                 sharpness: float = 30.0, carrier: float = 30.0) -> None:
        if mechanism not in MECHANISMS:
            raise LabError(f"gate toy mechanism must be one of {list(MECHANISMS)}, got {mechanism!r}")
        task = task or GateTask()
        K, V = task.n_values, len(task.vocab)
        self.layout = layout = SignedLayout(carrier, tok=V, value=K, shows=1, gate=K, answer=K)
        super().__init__(V, n_layers=2, d_model=layout.D, n_heads=2, d_ff=4, max_len=task.max_prompt_len,
                         pos_encoding="none")
        zero_weights(self)
        self.task, self.mechanism, self.source = task, mechanism, f"gate_toy_{mechanism}"
        self.img_token_id = task.vocab[IMG]
        self._set_weights(logit_scale, sharpness)

    def embed(self, batch: Mapping[str, Tensor], inject=None) -> Stream:
        if inject is None and batch.get("image_features") is not None:
            inject = (batch["image_features"], batch["tokens"] == self.img_token_id)
        return super().embed(batch, inject=inject)

    def image_features(self, samples) -> Tensor:
        """[B, P, D]: the carrier on every image token; the value and a ``shows`` flag on the one
        that shows it."""
        layout, P = self.layout, self.task.n_image_tokens
        u = torch.zeros(len(samples), P, layout.F)
        u[..., layout.at("carrier")] = layout.carrier
        for i, s in enumerate(samples):
            u[i, s.slot, layout.at("value", s.value)] = 1.0
            u[i, s.slot, layout.at("shows")] = 1.0
        return layout.code(u)

    def evaluation_data(self, batch_size: int = 256):
        """(task, {"image": data}) for the evaluators."""
        return self.task, {"image": GateData(self, batch_size)}

    @torch.no_grad()
    def _set_weights(self, logit_scale: float, sharpness: float) -> None:
        layout, task = self.layout, self.task
        at, n0, F, K = layout.at, layout.n0, layout.F, task.n_values
        bos, carrier = at("tok", task.vocab[BOS]), at("carrier")
        emb = layout.zeros(len(task.vocab))
        emb[:, carrier] = layout.carrier
        for t in range(len(task.vocab)):
            emb[t, at("tok", t)] = 1.0
        self.tok_emb.weight[:] = layout.code(emb)

        def head(layer: int, reader: str, target_key: int, source: str, dest: str) -> None:
            """Head 0 of ``layer``: the ``reader`` token attends to keys with feature
            ``target_key`` (everyone else to [BOS]) and copies ``source`` into ``dest``."""
            q, k, v, o = (layout.zeros(F) for _ in range(4))
            q[bos, carrier] = score_gain(layout, sharpness / 2, query_value=layout.carrier)
            q[target_key, at("tok", task.vocab[reader])] = score_gain(layout, sharpness)
            k[bos, bos] = k[target_key, target_key] = 1 / n0
            for i in range(K):
                v[at(source, i), at(source, i)] = 1 / n0
                o[at(dest, i), at(source, i)] = 1.0
            set_head(self, layout, layer, 0, q=q, k=k, v=v, o=o)

        if self.mechanism == "gate":
            head(0, CTX_END, at("shows"), "value", "gate")
            head(1, QUE, at("tok", task.vocab[CTX_END]), "gate", "answer")
        else:
            head(1, QUE, at("shows"), "value", "answer")
        unembed = layout.zeros(len(task.vocab))
        for i in range(K):
            unembed[task.value_token(i), at("answer", i)] = logit_scale / n0
        self.head.weight[:] = layout.reader(unembed)


class GateData:
    """Evaluation batches of the gate task with the toy's image features (modality ``image``)."""

    modality = "image"

    def __init__(self, model: GateToyModel, batch_size: int = 256) -> None:
        self.model, self.batch_size = model, int(batch_size)
        self._cache: dict[str, list[Batch]] = {}

    def eval_batches(self, split: str) -> list[Batch]:
        if split not in self._cache:
            samples = self.model.task.eval_set(split)
            batches = []
            for i in range(0, len(samples), self.batch_size):
                chunk = samples[i: i + self.batch_size]
                batch = collate_text(chunk, self.model.task.vocab.pad_id)
                batch.image_features = self.model.image_features(chunk)
                batches.append(batch)
            self._cache[split] = batches
        return self._cache[split]

"""The snowball construction: a hand-built residual model where the cosine score is wrong.

Task: each prompt is ``seq_len`` random class tokens; the answer is the class of the last token
(K classes, balanced, chance accuracy 1/K). The residual stream has width ``D = 3K + 2`` with
named subspaces: S1 (the token identity written by the embedding), S3 (a scratch space), S2
(the readout space: logits = h[S2]), ``z`` (a constant "carrier" direction of norm ``carrier``)
and ``w`` (a direction the readout ignores).

Blocks (all position-wise, so each token is handled independently):

- block 0, **tiny but crucial**: writes ``epsilon * onehot(token)`` into S3. Its cosine score
  ``1 - cos(h_0, h_1)`` is about ``epsilon^2 / (2 |h|^2)``, arbitrarily small;
- block 1, **loud but useless**: writes ``loud * w``, a large vector into a direction the readout
  ignores; its cosine score is ``1 - |h| / sqrt(|h|^2 + loud^2)`` (about 0.29 with the defaults);
- block 2, **amplifier**: maps S3 into the readout space S2 with gain ``amplify / epsilon``
  (the snowball: it turns block 0's tiny write into a decisive logit margin).

The embedding also writes a token-independent distractor ``d`` into S2 (a fixed vector whose
largest entry is class ``distractor_class``; its spread is smaller than ``amplify``). So with
all blocks the model is exact (accuracy 1); without block 0 (or 2) the logits are ``d`` for
every prompt, the model always answers ``distractor_class``, and accuracy falls to exactly
chance (1/K on the balanced evaluation set); without block 1 nothing changes. Accuracy
relevance ranks block 0 above block 1; the cosine score ranks them the wrong way round.

Run the demo: ``python evaluate.py experiment=snowball`` (outputs in ``eval_out/snowball``).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from lab.data.text import FixedLengthData
from lab.errors import LabError
from lab.models.interface import ResidualModel, Stream
from tasks.snowball import SnowballTask

TINY, LOUD, AMPLIFIER = 0, 1, 2


class SnowballModel(ResidualModel):
    """Hand-built 3-block residual model (see module docstring)."""

    def __init__(self, n_classes: int = 8, epsilon: float = 1e-3, carrier: float = 10.0, loud: float = 10.0,
                 amplify: float = 2.0, distractor: float = 1.0, distractor_class: int = 0) -> None:
        super().__init__()
        if n_classes < 2:
            raise LabError(f"snowball n_classes must be >= 2, got {n_classes}")
        if not 0 < epsilon < carrier:
            raise LabError(f"snowball epsilon must be in (0, carrier={carrier}), got {epsilon}")
        if not amplify > distractor > 0:
            raise LabError(f"snowball needs amplify > distractor > 0 (got {amplify}, {distractor}) so the amplified write wins")
        K = self.n_classes = int(n_classes)
        self.n_layers = 3
        self.D = 3 * K + 2
        self.epsilon, self.carrier, self.loud, self.amplify = float(epsilon), float(carrier), float(loud), float(amplify)
        self.s1, self.s3, self.s2 = slice(0, K), slice(K, 2 * K), slice(2 * K, 3 * K)
        self.z, self.w = 3 * K, 3 * K + 1
        # Distractor in the readout space: largest at distractor_class, spread < amplify.
        d = torch.linspace(0.0, distractor, K).flip(0).roll(int(distractor_class) % K)
        self.register_buffer("distractor", d)
        self.vocab_size = K

    def embed(self, batch: Mapping[str, Tensor]) -> Stream:
        tokens = batch["tokens"]
        B, T = tokens.shape
        h = torch.zeros(B, T, self.D, device=tokens.device)
        h[..., self.s1] = torch.nn.functional.one_hot(tokens, self.n_classes).float()
        h[..., self.s2] = self.distractor
        h[..., self.z] = self.carrier
        attend = batch.get("attend", torch.ones(B, T, dtype=torch.bool, device=tokens.device))
        return Stream(h=h, attend=attend, positions=torch.arange(T, device=tokens.device).expand(B, T))

    def block(self, layer: int, stream: Stream) -> Tensor:
        h = stream.h
        update = torch.zeros_like(h)
        if layer == TINY:
            update[..., self.s3] = self.epsilon * h[..., self.s1]
        elif layer == LOUD:
            update[..., self.w] = self.loud
        elif layer == AMPLIFIER:
            update[..., self.s2] = (self.amplify / self.epsilon) * h[..., self.s3]
        else:  # pragma: no cover - n_layers is 3
            raise IndexError(layer)
        return h + update

    def readout(self, h: Tensor) -> Tensor:
        return h[..., self.s2]

    # ------------------------------------------------------------------ its own evaluation data
    def evaluation_data(self, batch_size: int = 256, n_samples: int = 512, seq_len: int = 6, seed: int = 0):
        """(task, {modality: data}) for the evaluators: balanced random class prompts."""
        task = SnowballTask(self.n_classes, n_samples, seq_len, seed)
        return task, {"text": FixedLengthData(task, batch_size, n_objects=1)}


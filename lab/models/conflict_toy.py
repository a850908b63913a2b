"""A hand-built two-block transformer where an in-context mechanism and a memorised one compete:
the known answers of the logit lens, direct logit attribution and attention modification
evaluators (and of the interface's per-head records).

It is a :class:`~lab.models.backbone.Backbone` with hand-set weights (so the lab's real attention,
MLP and LayerNorm code runs), on the prompts of :mod:`tasks.conflict`
(``[BOS] t_1 a_1 ... t_n a_n t_q``):

- block 0, head 0: a **previous-token head** (each position attends to the one before it) writing
  the previous token into a ``prev`` register; head 1 and the MLP are idle (zero);
- block 1, head 1: an **induction head**: the last position (topic t_q) attends to the position
  whose previous token is t_q, i.e. the answer a_q shown with it (the ``demo_answer`` role), and
  writes ``context_gain`` times that answer into the ``answer`` register; head 0 is idle;
- block 1, MLP: the **memorised prior**: one hidden unit per topic writes ``prior_gain`` times the
  topic's prior answer into the same register;
- readout: ``logit_scale`` times the ``answer`` register (through the final LayerNorm).

So with ``context_gain > prior_gain`` the in-context answer wins; scaling block 1 head 1's
attention to ``demo_answer`` post-softmax by alpha (no renormalisation) makes it write
``alpha * context_gain``: the prior wins below ``alpha = prior_gain / context_gain``. The
residual stream is [u, -u] coded with a carrier (:mod:`lab.models.hand_built`), so every norm is
one known scale to a fraction of a percent.

Evaluate it: ``python evaluate.py experiment=conflict_toy`` (outputs in ``eval_out/conflict_toy``).
"""
from __future__ import annotations

import torch

from lab.errors import LabError
from lab.models.backbone import Backbone
from lab.models.hand_built import SignedLayout, score_gain, set_head, set_mlp, zero_weights
from tasks.conflict import ConflictTask

ANSWER_HEAD, PREVIOUS_TOKEN_HEAD = (1, 1), (0, 0)


class ConflictToyModel(Backbone):
    """The hand-built competition model (module docstring) for ``task`` (default ``ConflictTask()``)."""

    def __init__(self, task: ConflictTask | None = None, context_gain: float = 2.0, prior_gain: float = 1.0,
                 logit_scale: float = 5.0, sharpness: float = 30.0, carrier: float = 30.0) -> None:
        task = task or ConflictTask()
        if not context_gain > 0 or not prior_gain > 0:
            raise LabError(f"conflict toy gains must be > 0, got context_gain={context_gain}, prior_gain={prior_gain}")
        V, P = len(task.vocab), task.max_prompt_len
        layout = SignedLayout(carrier, tok=V, pos=P, prev=V, answer=V)
        super().__init__(V, n_layers=2, d_model=layout.D, n_heads=2, d_ff=task.n_topics, max_len=P,
                         pos_encoding="learned")
        zero_weights(self)
        self.task, self.source = task, "conflict_toy"
        self.context_gain, self.prior_gain = float(context_gain), float(prior_gain)
        self._set_weights(layout, logit_scale, sharpness)

    def evaluation_data(self, batch_size: int = 256):
        """(task, {"text": data}) for the evaluators."""
        from lab.data.datamodule import TextDataModule

        return self.task, {"text": TextDataModule(self.task, batch_size=1, eval_batch_size=batch_size)}

    @torch.no_grad()
    def _set_weights(self, layout: SignedLayout, logit_scale: float, sharpness: float) -> None:
        task, at, n0, F = self.task, layout.at, layout.n0, layout.F
        V, P = len(task.vocab), task.max_prompt_len
        emb = layout.zeros(V)
        emb[:, layout.slices["carrier"]] = layout.carrier
        for t in range(V):
            emb[t, at("tok", t)] = 1.0
        self.tok_emb.weight[:] = layout.code(emb)
        pos = layout.zeros(P)
        for p in range(P):
            pos[p, at("pos", p)] = 1.0
        self.pos_emb.weight[:] = layout.code(pos)
        g = score_gain(layout, sharpness)
        # block 0 head 0: position p looks for position p - 1 and copies its token into prev
        q, k, v, o = (layout.zeros(F) for _ in range(4))
        for p in range(1, P):
            q[at("pos", p - 1), at("pos", p)] = g
        for p in range(P):
            k[at("pos", p), at("pos", p)] = 1 / n0
        for t in range(V):
            v[at("tok", t), at("tok", t)] = 1 / n0
            o[at("prev", t), at("tok", t)] = 1.0
        set_head(self, layout, *PREVIOUS_TOKEN_HEAD, q=q, k=k, v=v, o=o)
        # block 1 head 1: token t looks for the key whose prev is t and copies its answer token
        q, k, v, o = (layout.zeros(F) for _ in range(4))
        for t in range(V):
            q[at("prev", t), at("tok", t)] = g
            k[at("prev", t), at("prev", t)] = 1 / n0
        for a in range(task.n_answers):
            t = task.answer_token(a)
            v[at("tok", t), at("tok", t)] = 1 / n0
            o[at("answer", t), at("tok", t)] = self.context_gain
        set_head(self, layout, *ANSWER_HEAD, q=q, k=k, v=v, o=o)
        # block 1 MLP: topic t -> prior_gain x its prior answer (a unit at +10 for t, -10 otherwise)
        w_in, w_out = layout.zeros(task.n_topics), torch.zeros(F, task.n_topics)
        for t in range(task.n_topics):
            w_in[t, at("tok", task.topic_token(t))] = 20.0 / n0
            w_out[at("answer", task.answer_token(int(task.prior[t]))), t] = self.prior_gain / 10.0
        set_mlp(self, layout, 1, w_in, torch.full((task.n_topics,), -10.0), w_out)
        unembed = layout.zeros(V)
        for t in range(V):
            unembed[t, at("answer", t)] = logit_scale / n0
        self.head.weight[:] = layout.reader(unembed)

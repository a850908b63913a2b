"""Indirect (two-hop) retrieval task: colour -> shape -> item.

A prompt is ``[BOS] c1 s1 ... cN sN [CTX_END] s_a i_a ... s_z i_z [QUE] c_q`` and the target is
the item associated with the shape of the object whose colour is ``c_q``. Filler ``[NOISE]``
tokens may be scattered through the context; models must not attend to them.

Everything here is pure and seeded: the same config and seed give the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.protocol import TaskConfigError
from tasks.vocab import BOS, CTX_END, NOISE, QUE, object_vocab

SPLITS = ("id", "ood")
_STREAM_TRAIN, _STREAM_EVAL = 0, 1


@dataclass
class RetrievalSample:
    """One prompt with its full structure (all positions index into ``tokens``)."""

    tokens: list[int]                        # prompt token ids; the answer is not included
    answer: int                              # token id of the target item
    n_objects: int
    colors: list[int]                        # colour index of each object, in context order
    shapes: list[int]                        # shape index of each object
    items: list[int]                         # item index bound to each object's shape
    object_positions: list[tuple[int, int]]  # (colour position, shape position) per object
    association_order: list[int]             # object index of each association, in order
    association_positions: list[tuple[int, int]]  # (shape position, item position)
    query_object: int                        # index of the queried object
    query_position: int                      # position of the query colour (the last token)
    ctx_end_position: int
    noise_positions: list[int] = field(default_factory=list)
    # Training-only follow-up queries (task.train_queries > 1): tokens that continue the prompt as
    # ``i_q [QUE] c_2 i_2 [QUE] c_3 ...`` and, for each extra query, (position, answer token id)
    # with positions counted in the continued sequence ``tokens + followup_tokens``.
    followup_tokens: list[int] = field(default_factory=list)
    followup_answers: list[tuple[int, int]] = field(default_factory=list)
    # Training-only one-hop queries (task.one_hop_queries > 0), also continuing the prompt:
    # ``[CTX_END] c_k`` asks for object k's shape (hop 1), ``[QUE] s_k`` for the item bound to
    # shape k (hop 2); (position, answer token id) in the continued sequence. Trained by
    # objective.one_hop, kept apart from the answer loss.
    one_hop_answers: list[tuple[int, int]] = field(default_factory=list)
    # Token id of the queried object's shape (the intermediate variable of the two hops), and the
    # same for each follow-up query; read only by the optional intermediate-supervision loss.
    query_shape: int = -1
    followup_shapes: list[int] = field(default_factory=list)

    @property
    def answer_item(self) -> int:
        return self.items[self.query_object]

    def objects(self) -> dict:
        """Per-object facts (indices, not token ids) for analyses; see :class:`lab.data.batch.Batch`."""
        return {"colors": self.colors, "shapes": self.shapes, "items": self.items,
                "association_order": self.association_order, "query_object": self.query_object}

    def roles(self) -> dict[str, list[int]]:
        """Token roles of the prompt (see :mod:`tasks.protocol`); objects in context order,
        associations in prompt order."""
        return {
            "context_color": [c for c, _ in self.object_positions],
            "context_shape": [s for _, s in self.object_positions],
            "ctx_end": [self.ctx_end_position],
            "association_shape": [s for s, _ in self.association_positions],
            "association_item": [i for _, i in self.association_positions],
            "query_marker": [self.query_position - 1],
            "query": [self.query_position],
            "noise": list(self.noise_positions),
        }


def _as_range(value, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise TaskConfigError(f"{name} must be a pair [min, max] of integers, got {value!r}") from None
    if lo > hi:
        raise TaskConfigError(f"{name}={[lo, hi]}: min is larger than max")
    return lo, hi


class RetrievalTask:
    """Seeded generator of retrieval samples plus the task's vocabulary and splits."""

    name = "retrieval"
    splits = SPLITS

    def __init__(
        self,
        n_colors: int = 24,
        n_shapes: int = 24,
        n_items: int = 16,
        id_objects=(2, 8),
        ood_objects=(9, 16),
        noise_tokens=(0, 0),
        eval_size: int = 512,
        train_queries: int = 1,
        one_hop_queries: int = 0,
        seed: int = 0,
    ) -> None:
        self.n_colors, self.n_shapes, self.n_items = int(n_colors), int(n_shapes), int(n_items)
        self.id_objects = _as_range(id_objects, "task.id_objects")
        self.ood_objects = _as_range(ood_objects, "task.ood_objects")
        self.noise_tokens = _as_range(noise_tokens, "task.noise_tokens")
        self.eval_size, self.seed = int(eval_size), int(seed)
        self.train_queries = int(train_queries)
        self.one_hop_queries = int(one_hop_queries)
        self._validate()
        self.vocab = object_vocab(self.n_colors, self.n_shapes, self.n_items)
        self._color0 = self.vocab["color_0"]
        self._shape0 = self.vocab["shape_0"]
        self._item0 = self.vocab["item_0"]
        self._eval_cache: dict[tuple[str, int], list[RetrievalSample]] = {}

    def _validate(self) -> None:
        for name in ("n_colors", "n_shapes", "n_items"):
            if getattr(self, name) < 1:
                raise TaskConfigError(f"task.{name} must be >= 1, got {getattr(self, name)}")
        (id_lo, id_hi), (ood_lo, ood_hi) = self.id_objects, self.ood_objects
        if id_lo < 1:
            raise TaskConfigError(f"task.id_objects must start at >= 1 object, got {list(self.id_objects)}")
        if id_hi >= ood_lo and ood_hi >= id_lo:
            raise TaskConfigError(
                f"task.id_objects={list(self.id_objects)} and task.ood_objects={list(self.ood_objects)} "
                "overlap; OOD object counts must lie outside the ID range (e.g. id [2,8], ood [9,16])"
            )
        most = max(id_hi, ood_hi)
        for name, size in (("n_colors", self.n_colors), ("n_shapes", self.n_shapes), ("n_items", self.n_items)):
            if most > size:
                raise TaskConfigError(
                    f"up to {most} objects need distinct colours, shapes and items, but task.{name}={size}; "
                    f"raise task.{name} or lower the object ranges"
                )
        if self.noise_tokens[0] < 0:
            raise TaskConfigError(f"task.noise_tokens must be >= 0, got {list(self.noise_tokens)}")
        if self.train_queries < 1:
            raise TaskConfigError(f"task.train_queries must be >= 1, got {self.train_queries}")
        if self.one_hop_queries < 0:
            raise TaskConfigError(f"task.one_hop_queries must be >= 0 (one-hop queries of each hop), got {self.one_hop_queries}")
        if self.eval_size < 1:
            raise TaskConfigError(f"task.eval_size must be >= 1, got {self.eval_size}")

    # ------------------------------------------------------------------ public API
    def object_range(self, split: str) -> tuple[int, int]:
        if split not in SPLITS:
            raise TaskConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.id_objects if split == "id" else self.ood_objects

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt any split can produce (for sizing positional tables)."""
        return 4 * self.max_objects + 4 + self.noise_tokens[1] + self.followup_len

    @property
    def followup_len(self) -> int:
        """Most tokens the training-only follow-ups (two-hop and one-hop queries) add to a prompt."""
        return 3 * (self.train_queries - 1 + 2 * self.one_hop_queries)

    @property
    def max_objects(self) -> int:
        return max(self.id_objects[1], self.ood_objects[1])

    def color_token(self, color: int) -> int:
        return self._color0 + int(color)

    def shape_token(self, shape: int) -> int:
        return self._shape0 + int(shape)

    def item_token(self, item: int) -> int:
        return self._item0 + int(item)

    @property
    def answer_token_ids(self) -> list[int]:
        return list(range(self._item0, self._item0 + self.n_items))

    def train_batch(self, step: int, batch_size: int, noise: bool = True) -> list[RetrievalSample]:
        """The training samples of one step: a pure function of (seed, step)."""
        rng = np.random.default_rng([self.seed, _STREAM_TRAIN, int(step)])
        lo, hi = self.id_objects
        batch = [self.sample(rng, int(rng.integers(lo, hi + 1)), noise) for _ in range(batch_size)]
        if self.train_queries > 1 or self.one_hop_queries:
            for sample in batch:
                self.add_followups(rng, sample)
        return batch

    def add_followups(self, rng: np.random.Generator, sample: RetrievalSample) -> None:
        """Extra supervision for training, continuing the prompt after its answer: up to
        ``train_queries - 1`` further two-hop queries ``[QUE] c_k`` (-> item), then
        ``one_hop_queries`` one-hop queries of each hop, shuffled: ``[CTX_END] c_k`` (-> shape) and
        ``[QUE] s_k`` (-> item). The first query (what evaluation asks) is unchanged, and causal
        models cannot see the follow-ups from it."""
        others = [i for i in rng.permutation(sample.n_objects).tolist() if i != sample.query_object]
        two_hop = [(self.vocab[QUE], self._color0 + sample.colors[o], self._item0 + sample.items[o], o)
                   for o in others[: self.train_queries - 1]]
        one_hop = []
        if self.one_hop_queries:
            k = self.one_hop_queries
            for o in rng.permutation(sample.n_objects)[:k].tolist():
                one_hop.append((self.vocab[CTX_END], self._color0 + sample.colors[o], self._shape0 + sample.shapes[o], None))
            for o in rng.permutation(sample.n_objects)[:k].tolist():
                one_hop.append((self.vocab[QUE], self._shape0 + sample.shapes[o], self._item0 + sample.items[o], None))
            one_hop = [one_hop[i] for i in rng.permutation(len(one_hop))]
        tokens, answers, shapes, aux = [sample.answer], [], [], []
        position = len(sample.tokens) + 1
        for marker, cue, target, obj in two_hop + one_hop:
            tokens += [marker, cue, target]
            position += 2
            if obj is None:
                aux.append((position - 1, target))
            else:
                answers.append((position - 1, target))
                shapes.append(self._shape0 + sample.shapes[obj])
            position += 1
        sample.followup_tokens, sample.followup_answers = tokens[:-1], answers
        sample.followup_shapes, sample.one_hop_answers = shapes, aux

    def eval_set(self, split: str, noise: bool = True) -> list[RetrievalSample]:
        """A fixed evaluation set for a split, balanced over the number of objects."""
        key = (split, int(noise))
        if key not in self._eval_cache:
            lo, hi = self.object_range(split)
            rng = np.random.default_rng([self.seed, _STREAM_EVAL, SPLITS.index(split), int(noise)])
            counts = [lo + i % (hi - lo + 1) for i in range(self.eval_size)]
            self._eval_cache[key] = [self.sample(rng, n, noise) for n in counts]
        return self._eval_cache[key]

    def counterfactual_pairs(self, split: str, n: int, seed: int = 0, n_objects: int | None = None):
        """Paired prompts for interchange interventions (see :func:`counterfactual_pairs`)."""
        return counterfactual_pairs(self, split, n, seed, n_objects)

    def chance_accuracy(self, samples: list[RetrievalSample]) -> float:
        """Accuracy of guessing uniformly among the items present in each prompt."""
        return float(np.mean([1.0 / s.n_objects for s in samples]))

    def sample(self, rng: np.random.Generator, n_objects: int, noise: bool = True) -> RetrievalSample:
        """Draw one sample with ``n_objects`` objects."""
        colors = rng.choice(self.n_colors, n_objects, replace=False).tolist()
        shapes = rng.choice(self.n_shapes, n_objects, replace=False).tolist()
        items = rng.choice(self.n_items, n_objects, replace=False).tolist()
        order = rng.permutation(n_objects).tolist()
        query = int(rng.integers(n_objects))
        n_noise = int(rng.integers(self.noise_tokens[0], self.noise_tokens[1] + 1)) if noise else 0
        gaps = rng.integers(0, 2 * n_objects + 1, n_noise).tolist()
        return self.build_sample(colors, shapes, items, order, query, gaps)

    def build_sample(self, colors, shapes, items, order, query: int, noise_gaps=()) -> RetrievalSample:
        """The sample with these objects (colour, shape and item indices in context order), this
        association order, queried object and noise-token gaps (indices into the context tokens)."""
        n_objects = len(colors)
        # Context: colour/shape pairs, with noise tokens dropped into the given gaps.
        context: list[int | None] = []
        for c, s in zip(colors, shapes):
            context += [self._color0 + c, self._shape0 + s]
        for gap in sorted(noise_gaps, reverse=True):
            context.insert(gap, None)

        tokens = [self.vocab[BOS]]
        object_positions, noise_positions, pending_color = [], [], None
        for tok in context:
            pos = len(tokens)
            if tok is None:
                noise_positions.append(pos)
                tokens.append(self.vocab[NOISE])
                continue
            tokens.append(tok)
            if pending_color is None:
                pending_color = pos
            else:
                object_positions.append((pending_color, pos))
                pending_color = None
        ctx_end = len(tokens)
        tokens.append(self.vocab[CTX_END])
        association_positions = []
        for obj in order:
            association_positions.append((len(tokens), len(tokens) + 1))
            tokens += [self._shape0 + shapes[obj], self._item0 + items[obj]]
        tokens.append(self.vocab[QUE])
        tokens.append(self._color0 + colors[query])
        return RetrievalSample(
            tokens=tokens,
            answer=self._item0 + items[query],
            n_objects=n_objects,
            colors=colors,
            shapes=shapes,
            items=items,
            object_positions=object_positions,
            association_order=order,
            association_positions=association_positions,
            query_object=query,
            query_position=len(tokens) - 1,
            ctx_end_position=ctx_end,
            noise_positions=noise_positions,
            query_shape=self._shape0 + shapes[query],
        )


# Outcomes of patching a counterfactual prompt's activation into a base prompt (tasks.retrieval).
HYPOTHESES = ("positional", "symbolic", "answer_copy", "no_effect")


@dataclass
class CounterfactualPair:
    """A base prompt, a counterfactual and the answer each binding hypothesis predicts for the
    base after C's activation is patched into it (token ids, pairwise different)."""

    base: RetrievalSample
    counterfactual: RetrievalSample
    predictions: dict[str, int]     # hypothesis -> predicted answer token
    slot: int                       # context slot C's query points to
    symbol_object: int              # the base object whose shape C queries


def counterfactual_pairs(task: RetrievalTask, split: str, n: int, seed: int = 0, n_objects: int | None = None):
    """``n`` seeded (base, counterfactual) pairs on ``split``'s object counts (at least 3 objects).

    B queries its object q. C has as many objects, fresh colours and items (its answer is an item B
    does not use, and its query colour a colour B does not use, so counts stop at ``n_items - 1`` and
    ``n_colors - 1``), and B's shapes rearranged so that C's queried
    object sits at slot k and carries the shape of B's object j, with q, k, j distinct. Patching C into B then predicts:
    positional -> B's item at slot k; symbolic -> B's item for shape j; answer copy -> C's item;
    no effect -> B's own answer. Both prompts are clean (no noise) and equally long, so every
    position means the same part of the prompt in both.
    """
    lo, hi = task.object_range(split) if n_objects is None else (n_objects, n_objects)
    if hi < 3:
        raise TaskConfigError(f"counterfactual pairs need >= 3 objects; split {split!r} has at most {hi}")
    lo, hi = max(lo, 3), min(hi, task.n_items - 1, task.n_colors - 1)  # C's answer and query colour: none of B's
    pairs = []
    rng = np.random.default_rng([task.seed, 20, task.splits.index(split), int(seed)])
    for i in range(n):
        count = lo + i % (hi - lo + 1)
        base = task.sample(rng, count, noise=False)
        q = base.query_object
        k, j = rng.choice([o for o in range(count) if o != q], 2, replace=False).tolist()
        shapes = [base.shapes[o] for o in rng.permutation(count).tolist()]
        a, b = shapes.index(base.shapes[j]), k  # move shape j to slot k
        shapes[a], shapes[b] = shapes[b], shapes[a]
        # C's query colour is none of B's, so patching the query token itself (h_0) points B at nothing.
        query_color = int(rng.choice([x for x in range(task.n_colors) if x not in base.colors]))
        colors = rng.choice([x for x in range(task.n_colors) if x != query_color], count, replace=False).tolist()
        colors[k] = query_color
        new = int(rng.choice([x for x in range(task.n_items) if x not in base.items]))
        items = rng.choice([x for x in range(task.n_items) if x != new], count, replace=False).tolist()
        items[k] = new  # C's answer is none of B's items; its other items may repeat B's
        counter = task.build_sample(colors, shapes, items, rng.permutation(count).tolist(), k)
        predictions = {
            "positional": task.item_token(base.items[k]),
            "symbolic": task.item_token(base.items[j]),
            "answer_copy": counter.answer,
            "no_effect": base.answer,
        }
        assert len(set(predictions.values())) == 4, predictions
        pairs.append(CounterfactualPair(base, counter, predictions, k, j))
    return pairs

"""Image-tokenized retrieval samples (pure, seeded; no torch).

The context of a retrieval prompt becomes a picture (:mod:`tasks.render`) read through ``P``
placeholder ``[IMG]`` tokens; associations and query stay text::

    [BOS] [IMG] x P [CTX_END] s_a i_a ... s_z i_z [QUE] c_q   ->  answer i_q

Training contexts come from a fixed *pool* of ``pool_size`` rendered contexts (objects and
layout) per object count, so a frozen encoder's features can be computed once; each training
sample takes a pool context and draws fresh items, association order and query on the fly.
Evaluation uses the task's own fixed evaluation samples (same objects, items and query as the
text evaluation set), each with its own seeded layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.render import Layout, Renderer
from tasks.protocol import TaskConfigError
from tasks.retrieval import CounterfactualPair, RetrievalSample, RetrievalTask
from tasks.vocab import BOS, CTX_END, IMG, QUE

_STREAM_POOL, _STREAM_TRAIN, _STREAM_EVAL, _STREAM_PAIRS = 10, 11, 12, 13


@dataclass(frozen=True)
class ImageContext:
    """The objects of one picture: colours, shapes and box corners (row, col) in pixels."""

    colors: tuple[int, ...]
    shapes: tuple[int, ...]
    corners: tuple[tuple[int, int], ...]

    @property
    def n_objects(self) -> int:
        return len(self.colors)


@dataclass
class ImageRetrievalSample(RetrievalSample):
    """A retrieval sample whose context is an image.

    ``object_positions`` is empty (objects are image patches, not tokens); the image occupies
    token positions ``image_start .. image_start + n_image_tokens - 1``. ``context_key`` names
    the picture, so its encoder features can be cached: ``("pool", n_objects, k)`` for training,
    ``("id"|"ood", i)`` for evaluation.
    """

    context: ImageContext | None = None
    context_key: tuple = ()
    image_start: int = 1
    n_image_tokens: int = 0

    def objects(self) -> dict:
        """As for text, plus ``corners``: the top-left (row, col) of each object's box, in pixels."""
        return {**super().objects(), "corners": [tuple(c) for c in self.context.corners]}

    def roles(self) -> dict[str, list[int]]:
        """As for text, with ``"image"`` (the image token positions) in place of the context tokens;
        ``"context_color"``/``"context_shape"`` are empty (objects are image patches)."""
        return {**super().roles(), "image": list(range(self.image_start, self.image_start + self.n_image_tokens))}


class ImageRetrieval:
    """Image-context samples for a :class:`RetrievalTask`, drawn with a :class:`Renderer`."""

    def __init__(self, task: RetrievalTask, renderer: Renderer, n_image_tokens: int, pool_size: int = 256) -> None:
        if n_image_tokens < 1:
            raise TaskConfigError(f"the image needs at least one token, got n_image_tokens={n_image_tokens}")
        if pool_size < 1:
            raise TaskConfigError(f"modality.pool_size must be >= 1, got {pool_size}")
        most = task.max_objects
        if most > renderer.capacity:
            raise TaskConfigError(
                f"up to {most} objects are requested but the canvas holds {renderer.capacity}; "
                "raise render.canvas_size or lower render.object_size"
            )
        self.task, self.renderer = task, renderer
        self.n_image_tokens, self.pool_size = int(n_image_tokens), int(pool_size)
        v = task.vocab
        self._bos, self._img, self._ctx_end, self._que = v[BOS], v[IMG], v[CTX_END], v[QUE]
        self._pools: dict[int, list[ImageContext]] = {}
        self._eval: dict[str, list[ImageRetrievalSample]] = {}

    # --------------------------------------------------------------------------- contexts
    def pool(self, n_objects: int) -> list[ImageContext]:
        """The ``pool_size`` training pictures with ``n_objects`` objects (fixed per task seed)."""
        if n_objects not in self._pools:
            rng = np.random.default_rng([self.task.seed, _STREAM_POOL, n_objects])
            self._pools[n_objects] = [self.random_context(rng, n_objects) for _ in range(self.pool_size)]
        return self._pools[n_objects]

    def random_context(self, rng: np.random.Generator, n_objects: int) -> ImageContext:
        colors = rng.choice(self.task.n_colors, n_objects, replace=False).tolist()
        shapes = rng.choice(self.task.n_shapes, n_objects, replace=False).tolist()
        return self._context(rng, colors, shapes)

    def _context(self, rng, colors, shapes) -> ImageContext:
        layout = self.renderer.layout(rng, len(colors))
        return ImageContext(tuple(int(c) for c in colors), tuple(int(s) for s in shapes), tuple(layout.corners))

    def image(self, context: ImageContext) -> np.ndarray:
        """The picture [H, W, 3] uint8 of a context."""
        return self.renderer.draw(context.colors, context.shapes, Layout(list(context.corners), self.renderer.object_size))

    # --------------------------------------------------------------------------- samples
    def sample(self, rng: np.random.Generator, context: ImageContext, key: tuple = ()) -> ImageRetrievalSample:
        """Fresh items, association order and query for a picture."""
        n = context.n_objects
        items = rng.choice(self.task.n_items, n, replace=False).tolist()
        order = rng.permutation(n).tolist()
        query = int(rng.integers(n))
        return self._build(context, items, order, query, key)

    def _build(self, context: ImageContext, items, order, query: int, key: tuple) -> ImageRetrievalSample:
        t = self.task
        tokens = [self._bos] + [self._img] * self.n_image_tokens
        ctx_end = len(tokens)
        tokens.append(self._ctx_end)
        association_positions = []
        for obj in order:
            association_positions.append((len(tokens), len(tokens) + 1))
            tokens += [t.shape_token(context.shapes[obj]), t.item_token(items[obj])]
        tokens += [self._que, t.color_token(context.colors[query])]
        return ImageRetrievalSample(
            tokens=tokens,
            answer=t.item_token(items[query]),
            n_objects=context.n_objects,
            colors=list(context.colors),
            shapes=list(context.shapes),
            items=list(items),
            object_positions=[],
            association_order=list(order),
            association_positions=association_positions,
            query_object=query,
            query_position=len(tokens) - 1,
            ctx_end_position=ctx_end,
            noise_positions=[],
            query_shape=t.shape_token(context.shapes[query]),
            context=context,
            context_key=key,
            image_start=1,
            n_image_tokens=self.n_image_tokens,
        )

    def train_batch(self, index: int, batch_size: int) -> list[ImageRetrievalSample]:
        """Training batch ``index``: a pure function of (task seed, index)."""
        rng = np.random.default_rng([self.task.seed, _STREAM_TRAIN, int(index)])
        lo, hi = self.task.id_objects
        out = []
        for _ in range(batch_size):
            n = int(rng.integers(lo, hi + 1))
            k = int(rng.integers(self.pool_size))
            out.append(self.sample(rng, self.pool(n)[k], ("pool", n, k)))
        if self.task.followup_len:  # follow-up queries, as for text training
            for sample in out:
                self.task.add_followups(rng, sample)
        return out

    def eval_set(self, split: str) -> list[ImageRetrievalSample]:
        """The task's clean evaluation samples of ``split`` with their contexts drawn as pictures."""
        if split not in self._eval:
            text = self.task.eval_set(split, noise=False)
            samples = []
            for i, s in enumerate(text):
                rng = np.random.default_rng([self.task.seed, _STREAM_EVAL, self.task.splits.index(split), i])
                context = self._context(rng, s.colors, s.shapes)
                samples.append(self._build(context, s.items, s.association_order, s.query_object, (split, i)))
            self._eval[split] = samples
        return self._eval[split]

    def counterfactual_pairs(self, split: str, n: int, seed: int = 0, n_objects: int | None = None,
                             group: str = "pairs") -> list[CounterfactualPair]:
        """The task's text pairs (:func:`tasks.retrieval.counterfactual_pairs`) with both contexts drawn.

        "Slot" of a drawn context means *where an object is*: object i of C is drawn in the same
        box as object i of B (one seeded layout per pair), so C's queried object (context index k)
        sits exactly where B's object k sits and carries the shape of B's object j. Patching C
        into B then predicts positional -> B's item at that place, symbolic -> B's item for shape j
        (the predictions of the text pair, unchanged). The picture has no reading order: the
        context index is only the order in which the layout placed the boxes, so "positional" in an
        image is binding by location. Context keys are ``(f"{group}_base", i)`` and
        ``(f"{group}_counterfactual", i)``.
        """
        text = self.task.counterfactual_pairs(split, n, seed, n_objects)
        rng = np.random.default_rng([self.task.seed, _STREAM_PAIRS, self.task.splits.index(split), int(seed)])
        pairs = []
        for i, pair in enumerate(text):
            corners = tuple(self.renderer.layout(rng, pair.base.n_objects).corners)
            drawn = {}
            for role, sample in (("base", pair.base), ("counterfactual", pair.counterfactual)):
                context = ImageContext(tuple(sample.colors), tuple(sample.shapes), corners)
                drawn[role] = self._build(context, sample.items, sample.association_order, sample.query_object,
                                          (f"{group}_{role}", i))
            pairs.append(CounterfactualPair(drawn["base"], drawn["counterfactual"], dict(pair.predictions),
                                            pair.slot, pair.symbol_object))
        return pairs

    @property
    def max_prompt_len(self) -> int:
        return image_prompt_len(self.task, self.n_image_tokens)


def image_prompt_len(task: RetrievalTask, n_image_tokens: int) -> int:
    """Longest image prompt: [BOS], the image, [CTX_END], the associations, [QUE] c_q, follow-ups."""
    return 1 + n_image_tokens + 1 + 2 * task.max_objects + 2 + task.followup_len

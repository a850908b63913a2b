"""What the lab expects of a task and of its samples (pure Python, no torch).

A task is any object with the members of :class:`Task`; its samples have the members of
:class:`Sample`. The training data streams (``lab/data``), the model builder (``lab/build.py``)
and every evaluator rely on nothing else, so adding a task means one ``tasks/<name>.py`` and one
``conf/task/<name>.yaml`` whose ``_target_`` builds it (see ``tasks/one_hop.py`` for the smallest
example).

Token roles: a sample names the positions that play each part of the prompt (``roles()``:
e.g. ``"context_color"`` -> the positions of the context colours, ``"query"`` -> the position the
answer is read at). Batches carry them as padded tensors, so evaluators can patch, knock out or
probe "the query colour" or "the association items" without knowing the prompt layout.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


class TaskConfigError(ValueError):
    """A task setting that cannot produce valid samples."""


@runtime_checkable
class Sample(Protocol):
    tokens: list[int]        # prompt token ids (the answer is not included)
    answer: int              # token id predicted at ``query_position``
    n_objects: int           # the size of the prompt's problem (the OOD axis); 0 if not defined
    query_position: int      # where the answer is read (the last prompt token)

    def roles(self) -> dict[str, list[int]]:
        """Positions of each token role of the prompt (role name -> positions, in prompt order)."""
        ...


@runtime_checkable
class Task(Protocol):
    name: str                       # stamped into checkpoints: a checkpoint only loads into its task
    splits: Sequence[str]           # evaluation splits, e.g. ("id", "ood")
    vocab: object                   # tasks.vocab.Vocab: tokens, ids, pad_id, decode()
    eval_size: int

    @property
    def max_prompt_len(self) -> int:
        """Longest training or evaluation prompt, follow-up queries included."""
        ...

    @property
    def max_objects(self) -> int:
        """Largest number of objects of any split (sizes renderers and image prompts)."""
        ...

    def train_batch(self, step: int, batch_size: int, noise: bool = True) -> list[Sample]:
        """The training samples of one step: a pure function of (task seed, step)."""
        ...

    def eval_set(self, split: str, noise: bool = True) -> list[Sample]:
        """A fixed, seeded evaluation set of a split."""
        ...

    def chance_accuracy(self, samples: list[Sample]) -> float:
        """Accuracy of the task's natural guessing baseline on these samples."""
        ...

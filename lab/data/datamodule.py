"""Lightning data module: on-the-fly training batches and fixed evaluation sets."""
from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lab.data.batch import Batch
from lab.data.text import collate_text


class StepStream(IterableDataset):
    """Infinite stream over training steps, yielding ``item(step)`` from ``start_step`` on.

    ``start_step`` is set from the trainer's global step when training (re)starts (and
    ``rank``/``world_size`` under DDP) by ``DataStepSync``, so a resumed run sees exactly the
    batches an uninterrupted run would. Subclasses implement ``batch(index)``.
    """

    def __init__(self) -> None:
        self.start_step, self.rank, self.world_size = 0, 0, 1

    def index(self, step: int) -> int:
        """The batch index of ``step`` on this rank: each DDP rank draws its own batches."""
        return step * self.world_size + self.rank

    def item(self, step: int):
        return self.batch(self.index(step))

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.item(step)
            step += 1


class StepBatches(StepStream):
    """Training batches of a text task; batch ``index`` depends only on (task seed, index)."""

    def __init__(self, task, batch_size: int, collate: Callable, noise: bool = True) -> None:
        super().__init__()
        self.task, self.batch_size, self.collate, self.noise = task, batch_size, collate, noise

    def batch(self, index: int, noise: bool | None = None) -> dict:
        """Training batch number ``index`` (a pure function of the task seed and ``index``)."""
        noise = self.noise if noise is None else noise
        return self.collate(self.task.train_batch(index, self.batch_size, noise))


class Batched(Dataset):
    """A fixed sample list served as pre-collated batches."""

    def __init__(self, samples: Sequence, batch_size: int, collate: Callable) -> None:
        self.batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.batches[i]


def _loader(dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=0)


class TextDataModule(L.LightningDataModule):
    """A text data stream for a task: one training stream, one validation set per split.

    ``name`` is the stream's name in regime mixes and metric names (``val/<name>_<split>_acc``);
    ``noise`` whether training prompts get the task's noise tokens; ``validate=False`` for a stream
    that only trains (e.g. ``noisy_text``, whose evaluation prompts are the clean ``text`` ones).
    """

    def __init__(self, task, batch_size: int = 64, eval_batch_size: int = 256, noise: bool = True,
                 name: str = "text", validate: bool = True) -> None:
        super().__init__()
        self.task, self.batch_size, self.eval_batch_size, self.noise = task, batch_size, eval_batch_size, noise
        self.modality, self.validate = str(name), bool(validate)
        self.collate = lambda samples: collate_text(samples, task.vocab.pad_id)
        self.train_stream = StepBatches(task, batch_size, self.collate, noise)
        self.val_names = [f"{self.modality}_{split}" for split in task.splits] if self.validate else []

    def train_batch(self, index: int, noise: bool | None = None) -> dict:
        return self.train_stream.batch(index, noise)

    def eval_batches(self, split: str) -> Batched:
        """Fixed evaluation batches; always clean (no noise tokens), whatever training uses."""
        return Batched(self.task.eval_set(split, noise=False), self.eval_batch_size, self.collate)

    def pairs(self, split: str, n: int, seed: int = 0, **options):
        """The task's counterfactual pairs (``task.counterfactual_pairs``): (specs, base batch,
        counterfactual batch)."""
        specs = self.task.counterfactual_pairs(split, n, seed=seed, **options)
        return specs, self.collate([p.base for p in specs]), self.collate([p.counterfactual for p in specs])

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_stream)

    def val_dataloader(self) -> list[DataLoader]:
        return [_loader(self.eval_batches(split)) for split in self.task.splits] if self.validate else []


def to_device(batch, device):
    """A batch (a :class:`~lab.data.batch.Batch` or a plain dict of tensors) on ``device``."""
    if isinstance(batch, Batch):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

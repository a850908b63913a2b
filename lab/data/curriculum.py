"""Training data of a regime: each step draws its batch from one modality, chosen by the phase mix."""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L

from lab.data.datamodule import StepStream, _loader


@dataclass(frozen=True)
class PendingStep:
    """Placeholder for training step ``step``, turned into its batch just before the step runs."""

    step: int


class CurriculumStream(StepStream):
    """Infinite stream of training steps; step ``s`` becomes ``data[m].train_batch(s)`` with ``m``
    from the current phase's mix. ``start_step``/``rank``/``world_size`` are set by ``DataStepSync``.

    The iterator yields only a :class:`PendingStep`; the batch is built when the step is
    actually trained (:meth:`CurriculumDataModule.on_before_batch_transfer`), because Lightning
    prefetches one batch ahead and a phase may end in between.
    """

    def __init__(self, data: dict, controller, seed: int) -> None:
        super().__init__()
        self.data, self.controller, self.seed = data, controller, seed

    def batch(self, step: int) -> dict:
        phase = self.controller.phase
        modality = phase.modality_at(self.seed, step)
        return self.data[modality].train_batch(self.index(step), noise=phase.noise)

    def item(self, step: int) -> PendingStep:
        return PendingStep(step)


class CurriculumDataModule(L.LightningDataModule):
    """Wraps one data module per modality; validates on every modality's ID and OOD sets."""

    def __init__(self, data: dict, controller, seed: int) -> None:
        super().__init__()
        self.data = data
        self.train_stream = CurriculumStream(data, controller, seed)
        self.val_names = [name for dm in data.values() for name in dm.val_names]

    def train_dataloader(self):
        return _loader(self.train_stream)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, PendingStep):
            return self.train_stream.batch(batch.step)
        return batch

    def val_dataloader(self):
        return [loader for dm in self.data.values() for loader in dm.val_dataloader()]

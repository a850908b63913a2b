"""Training data of a regime: each step draws its batch from one modality, chosen by the phase mix."""
from __future__ import annotations

import lightning as L

from lab.data.datamodule import StepStream, _loader


class CurriculumStream(StepStream):
    """Infinite stream of training steps; step ``s`` becomes ``data[m].train_batch(s)`` with ``m``
    from the current phase's mix. ``start_step``/``rank``/``world_size`` are set by ``DataStepSync``.

    The iterator yields only ``{"curriculum_step": s}``; the batch is built when the step is
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

    def item(self, step: int) -> dict:
        return {"curriculum_step": step}


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
        if "curriculum_step" in batch:
            return self.train_stream.batch(int(batch["curriculum_step"]))
        return batch

    def val_dataloader(self):
        return [loader for dm in self.data.values() for loader in dm.val_dataloader()]

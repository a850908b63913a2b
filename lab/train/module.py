"""LightningModule: the sum of the injected objectives; validation accuracy per split and object count."""
from __future__ import annotations

import math
from collections import defaultdict

import lightning as L
import torch

from torch import nn

from lab.errors import LabError
from lab.models.interface import ResidualModel
from lab.train.objectives import AnswerLoss, labelled_run, linear_fade


class NonFiniteLossError(LabError):
    """The training loss or the weights became NaN or infinite."""

    def __init__(self, what: str, step: int) -> None:
        self.problem = f"{what} at step {step}: the run diverged"
        super().__init__(
            f"{what} by step {step}: the run diverged; lower train.lr (or raise train.warmup_steps) and start a "
            "new run. The checkpoints hold the last finite validation."
        )


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def set_shift_scale(model: nn.Module, scale: float) -> None:
    """Write ``scale`` into the ``shift_scale`` buffer of every token-shift backbone in ``model``."""
    found = False
    for module in model.modules():
        if isinstance(getattr(module, "shift_scale", None), torch.Tensor):
            module.shift_scale.fill_(scale)
            found = True
    if not found:
        raise LabError("train.shift_fade needs a model with a token shift (model.token_shift=true or associations)")


class AnswerAccuracy:
    """Accumulates correct/total counts overall and per number of objects."""

    def __init__(self) -> None:
        self.correct: dict[int, int] = defaultdict(int)
        self.total: dict[int, int] = defaultdict(int)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, n_objects: torch.Tensor) -> None:
        hits = (logits.argmax(-1) == targets).cpu()
        for n, hit in zip(n_objects.cpu().tolist(), hits.tolist()):
            self.correct[n] += int(hit)
            self.total[n] += 1

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def per_count(self) -> dict[int, float]:
        return {n: self.correct[n] / self.total[n] for n in sorted(self.total)}


class TrainingModule(L.LightningModule):
    """Trains a :class:`ResidualModel` with injected objective parts (:mod:`lab.train.objectives`)
    and validates answer accuracy per split and object count.

    Nothing here is specific to a task: the objectives read the typed batch, and validation reads
    ``answer_pos``/``targets``/``n_objects``.
    """

    def __init__(
        self,
        model: ResidualModel,
        objectives: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas=(0.9, 0.98),
        warmup_steps: int = 200,
        total_steps: int = 10000,
        lr_factor=None,
        val_names: list[str] | None = None,
        decoder=None,
        meta: dict | None = None,
        shift_fade: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(objectives if objectives is not None else {"answer": AnswerLoss()})
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        # LR multiplier per global step; default warm-up + cosine over ``total_steps``.
        self.lr_factor = lr_factor or warmup_cosine(warmup_steps, total_steps)
        self.val_names = list(val_names or [])
        self.decoder = decoder  # optional: token ids -> strings, for logging samples
        self.meta = meta  # stamped into checkpoints as ``lab_meta`` (which task they belong to)
        # [start, end]: the model's token shift is scaled linearly from 1 to 0 over these steps.
        self.shift_fade = tuple(int(v) for v in shift_fade) if shift_fade is not None else None
        self._val: dict[str, AnswerAccuracy] = {}
        self.last_val_metrics: dict[str, float] = {}

    def forward(self, batch):
        return self.model.answer_logits(batch)

    def training_step(self, batch, batch_idx):
        step, logging = self.global_step, self._logging_step()
        if self.shift_fade is not None:
            scale = linear_fade(self.shift_fade, step)
            set_shift_scale(self.model, scale)
            if logging:
                self.log("train/shift_scale", scale)
        active = {}
        for name, part in self.objectives.items():
            weight = part.weight_at(step)
            if weight > 0 and part.applies(batch):
                active[name] = (part, weight)
        out = labelled_run(self.model, batch, capture=[l for part, _ in active.values() for l in part.layers])
        loss = 0.0
        for name, (part, weight) in active.items():
            part_loss = part.loss(self.model, batch, out)
            loss = loss + weight * part_loss
            if logging and name != "answer":
                self.log_dict({f"train/{name}_loss": part_loss, f"train/{name}_weight": weight})
        if not torch.is_tensor(loss):
            raise LabError(f"no training objective is active at step {step}; give objective.answer a weight > 0")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()}", step)
        if logging:
            logits = out.answer_logits
            acc = (logits.argmax(-1) == batch["targets"]).float().mean()
            self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=len(logits))
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def aid_fading(self, step: int) -> bool:
        """Whether an annealed objective part still acts at ``step`` (saturation does not count then)."""
        shift_fading = self.shift_fade is not None and step < self.shift_fade[1]
        return shift_fading or any(part.fading(step) for part in self.objectives.values())

    def _logging_step(self) -> bool:
        """Whether Lightning will write this step's metrics to the logger (every
        ``trainer.log_every_n_steps`` steps, its own rule). Logging on the other steps only costs
        time: ~0.5 ms per ``self.log`` call, and a progress bar that reads (syncs) them every step."""
        trainer = self._trainer
        if trainer is None:
            return True
        n = trainer.log_every_n_steps
        return n > 0 and (self.global_step + 1) % n == 0

    def on_validation_epoch_start(self) -> None:
        self._val = {name: AnswerAccuracy() for name in self.val_names}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        logits = self(batch)
        name = self.val_names[dataloader_idx]
        self._val[name].update(logits, batch["targets"], batch["n_objects"])
        if batch_idx == 0 and self.decoder is not None and self.logger is not None:
            self._log_samples(name, batch, logits)

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for name, acc in self._val.items():
            if not acc.total:
                continue
            metrics[f"val/{name}_acc"] = acc.accuracy
            for n, value in acc.per_count().items():
                metrics[f"val_n/{name}_n{n:02d}"] = value
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key.startswith("val/"), add_dataloader_idx=False)
        self.last_val_metrics = metrics

    def _log_samples(self, name: str, batch, logits, k: int = 3) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        lines = []
        for i in range(min(k, len(logits))):
            prompt = self.decoder(batch["tokens"][i][: int(batch["answer_pos"][i]) + 1])
            lines.append(
                f"`{' '.join(prompt)}` -> predicted **{self.decoder([logits[i].argmax()])[0]}**, "
                f"target **{self.decoder([batch['targets'][i]])[0]}**"
            )
        experiment.add_text(f"samples/{name}", "  \n".join(lines), self.global_step)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=self.betas,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # RNG state travels with the checkpoint so a resumed run draws the same dropout masks.
    def on_save_checkpoint(self, checkpoint) -> None:
        # A checkpoint with NaN/inf weights is refused here, before it is written, so the files on
        # disk always hold the last finite state of a diverging run.
        bad = next((n for n, p in self.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise NonFiniteLossError(f"weights became non-finite ({bad})", self.global_step)
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if self.meta is not None:
            checkpoint["lab_meta"] = self.meta

    def on_load_checkpoint(self, checkpoint) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

"""Regimes: a curriculum of phases, each with a modality mix, a noise setting and a stop rule.

A phase ends at its step budget (``max_steps``) or, when ``until`` names a validation metric,
once that metric has stayed at or above its stream's threshold (:func:`saturation_threshold`: one
rule, ``train.stop.image_threshold`` for image metrics, ``train.stop.threshold`` for the others) for
``train.stop.patience`` validations. :class:`PhaseController` runs
inside one Lightning ``fit``: it advances phases at validation time, checkpoints each finished phase
as ``phase<i>_<name>.ckpt``, and its state travels in the checkpoint so a resumed run continues in
the right phase.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from lab.errors import LabError
from lab.train.module import warmup_cosine


@dataclass
class Phase:
    name: str
    mix: dict[str, float]            # modality -> probability that a step's batch is of it
    max_steps: int
    until: str | None = None         # metric that ends the phase when saturated, or None
    noise: bool | None = None        # override the streams' own noise setting (None: keep it)
    lr: float | None = None          # phase learning rate (default train.lr)
    threshold: float | None = None   # saturation level of ``until`` (its stream's: saturation_threshold)

    def modality_at(self, seed: int, step: int) -> str:
        """The modality of training step ``step``: a pure function of (seed, step)."""
        names = sorted(self.mix)
        if len(names) == 1:
            return names[0]
        u = np.random.default_rng([seed, 7, step]).random()
        weights = np.cumsum([self.mix[n] for n in names])
        return names[int(np.searchsorted(weights / weights[-1], u, side="right"))]


@dataclass
class Regime:
    name: str
    phases: list[Phase] = field(default_factory=list)
    best_monitor: str = "val/text_id_acc"  # metric that picks best.ckpt

    @property
    def max_steps(self) -> int:
        return sum(p.max_steps for p in self.phases)


def saturation_threshold(metric: str, stop: DictConfig) -> float:
    """The level at which ``metric`` counts as saturated: the image stream's for image metrics
    (solved images hover at 0.96-0.98), the run's threshold for every other stream."""
    return float(stop.image_threshold if metric.startswith("val/image") else stop.threshold)


def parse_regime(cfg: DictConfig, primary: str, available: list[str]) -> Regime:
    """Build and validate the regime of ``cfg.regime``; ``primary`` fills phases without a mix."""
    node = cfg.regime
    val_every, phases = cfg.train.val_every, []
    if not node.get("phases"):
        raise LabError(f"regime {node.get('name')!r} has no phases")
    for i, raw in enumerate(node.phases):
        where = f"regime.phases[{i}] ({raw.get('name', '?')})"
        mix = dict(raw.mix) if raw.get("mix") else {primary: 1.0}
        unknown = [m for m in mix if m not in available]
        if unknown:
            raise LabError(f"{where}: unknown modality {unknown}; available: {available}")
        if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise LabError(f"{where}: mix weights must be >= 0 and not all zero, got {mix}")
        max_steps = int(raw.get("max_steps") or cfg.train.max_steps)
        if max_steps < 1 or max_steps % val_every:
            raise LabError(
                f"{where}: max_steps={max_steps} must be a positive multiple of train.val_every={val_every} "
                "(phases end at validations)"
            )
        until = raw.get("until", "auto")
        if until == "auto":
            until = f"val/{max(mix, key=mix.get)}_id_acc"
        threshold = None if until is None else saturation_threshold(until, cfg.train.stop)
        if raw.get("threshold") is not None and (threshold is None or float(raw.threshold) != threshold):
            # accepted only when it restates the rule (configs saved before the rule was the only one)
            raise LabError(f"{where}: phases take no threshold of their own; saturation is one rule per stream, "
                           "train.stop.threshold (text) and train.stop.image_threshold (image): set those instead")
        phases.append(
            Phase(
                name=str(raw.get("name", f"phase{i}")),
                mix={m: float(w) for m, w in mix.items() if w > 0},
                max_steps=max_steps,
                until=until,
                noise=None if raw.get("noise") is None else bool(raw.get("noise")),
                lr=raw.get("lr"),
                threshold=threshold,
            )
        )
    return Regime(name=str(node.get("name", "custom")), phases=phases)


def match_steps(regime: Regime, run_dir: str, val_every: int) -> Regime:
    """Give a single-phase regime the total step count of another run (a step-matched control)."""
    metrics = Path(run_dir) / "metrics.json"
    if len(regime.phases) != 1:
        raise LabError("regime.match_steps_of needs a single-phase regime (e.g. regime=text_control)")
    if not metrics.is_file():
        raise LabError(f"regime.match_steps_of={run_dir}: no metrics.json there; point it at a finished run")
    phases, config = Path(run_dir) / "phases.json", Path(run_dir) / "config.yaml"
    if config.is_file():
        planned = len((OmegaConf.load(config).get("regime") or {}).get("phases") or [])
        done = len(json.loads(phases.read_text())) if phases.is_file() else 0
        if planned and done < planned:
            raise LabError(f"regime.match_steps_of={run_dir}: that run has finished {done} of its {planned} phases; "
                           "wait until it ends (or resume it), then start the control")
    steps = int(json.loads(metrics.read_text())["step"])
    steps = max(val_every, -(-steps // val_every) * val_every)
    regime.phases[0].max_steps, regime.phases[0].until = steps, None
    return regime


class PhaseController(L.Callback):
    """Tracks the current phase and ends it at validation time (budget or saturation)."""

    def __init__(self, regime: Regime, run_dir: str | Path, threshold: float, patience: int) -> None:
        self.regime, self.run_dir = regime, Path(run_dir)
        self.threshold, self.patience = threshold, max(1, int(patience))
        self.index, self.start, self.hits = 0, 0, 0
        self.history: list[dict] = []

    @property
    def phase(self) -> Phase:
        return self.regime.phases[min(self.index, len(self.regime.phases) - 1)]

    def phase_step(self, global_step: int) -> int:
        return global_step - self.start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.index >= len(self.regime.phases):
            return
        phase, metrics = self.phase, trainer.callback_metrics
        if phase.until is not None:
            if phase.until not in metrics:
                raise LabError(f"phase {phase.name!r} stops on {phase.until!r}, which validation does not log; "
                               f"logged: {sorted(k for k in metrics if k.startswith('val/'))}")
            # While an annealed training aid is still fading, saturation does not count: a run is
            # solved only once it solves the task on its own.
            aided = getattr(pl_module, "aid_fading", lambda step: False)(trainer.global_step)
            threshold = self.threshold if phase.threshold is None else phase.threshold
            self.hits = self.hits + 1 if float(metrics[phase.until]) >= threshold and not aided else 0
        saturated = phase.until is not None and self.hits >= self.patience
        if saturated or self.phase_step(trainer.global_step) >= phase.max_steps:
            self._finish_phase(trainer, "saturated" if saturated else "budget")

    def _finish_phase(self, trainer, reason: str) -> None:
        phase = self.phase
        record = {"phase": self.index, "name": phase.name, "start": self.start, "end": trainer.global_step,
                  "reason": reason, **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
        self.history.append(record)
        self.index, self.start, self.hits = self.index + 1, trainer.global_step, 0
        if self.index >= len(self.regime.phases):
            trainer.should_stop = True
        trainer.save_checkpoint(self.run_dir / f"phase{record['phase']}_{phase.name}.ckpt", weights_only=False)  # full state: resumable
        if trainer.is_global_zero:
            (self.run_dir / "phases.json").write_text(json.dumps(self.history, indent=2))

    def state_dict(self) -> dict:
        return {"index": self.index, "start": self.start, "hits": self.hits, "history": json.dumps(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.index, self.start, self.hits = state_dict["index"], state_dict["start"], state_dict["hits"]
        self.history = json.loads(state_dict["history"])




def phase_lr_factor(controller: PhaseController, warmup_steps: int, base_lr: float):
    """LR multiplier restarting warm-up + cosine at each phase, scaled to the phase's own lr."""

    def factor(step: int) -> float:
        phase = controller.phase
        schedule = warmup_cosine(min(warmup_steps, phase.max_steps // 2), phase.max_steps)
        return schedule(step - controller.start) * (phase.lr or base_lr) / base_lr

    return factor

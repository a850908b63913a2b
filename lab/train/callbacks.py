"""Training callbacks: keep the data stream in step with the trainer, write metrics."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class DataStepSync(L.Callback):
    """Point the on-the-fly training stream at the trainer's global step (and DDP rank).

    Lightning creates the training iterator, and prefetches its first batch, before
    ``on_train_start``; so the step is set in ``setup`` (0) and, on resume, from the checkpoint
    being restored (``on_load_checkpoint``), both of which run before the iterator exists.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        stream = trainer.datamodule.train_stream
        stream.start_step = 0
        stream.rank, stream.world_size = trainer.global_rank, trainer.world_size

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        trainer.datamodule.train_stream.start_step = int(checkpoint["global_step"])

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.datamodule.train_stream.start_step != trainer.global_step:
            raise RuntimeError(
                f"training stream starts at step {trainer.datamodule.train_stream.start_step}, "
                f"but the trainer is at step {trainer.global_step}"
            )


class MetricsFile(L.Callback):
    """Append every validation's metrics to ``metrics.jsonl``; write the latest to ``metrics.json``.

    On resume, lines from steps after the restored checkpoint are dropped, so the file reads
    as if the run had never been interrupted.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.summary = Path(run_dir) / "metrics.json"

    def on_train_start(self, trainer, pl_module) -> None:
        if self.path.exists() and trainer.global_step > 0:
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= trainer.global_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        record = {"step": trainer.global_step, **{k: round(float(v), 6) for k, v in pl_module.last_val_metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.summary.write_text(json.dumps(record, indent=2))

"""Training callbacks: keep the data stream in step with the trainer, write metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


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

    ``times.jsonl`` records, per validation, the wall-clock and process CPU seconds spent in
    training so far (from the start of ``fit``, validation included; a resumed run adds to the
    times it resumed from); it is kept apart so that ``metrics.jsonl`` stays byte-identical across
    reruns. On resume, lines from steps after the restored checkpoint are dropped from both, so
    the files read as if the run had never been interrupted.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.summary = Path(run_dir) / "metrics.json"
        self.times = Path(run_dir) / "times.jsonl"
        self._offset = (0.0, 0.0)
        self._start = (time.perf_counter(), time.process_time())

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), time.process_time())
        if trainer.global_step == 0:
            return
        for path in (self.path, self.times):
            if path.exists():
                kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= trainer.global_step]
                path.write_text("".join(l + "\n" for l in kept))
                if path == self.times and kept:
                    last = json.loads(kept[-1])
                    self._offset = (last["wall_s"], last["cpu_s"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        wall = self._offset[0] + time.perf_counter() - self._start[0]
        cpu = self._offset[1] + time.process_time() - self._start[1]
        with self.times.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}) + "\n")
        record = {"step": trainer.global_step, **{k: round(float(v), 6) for k, v in pl_module.last_val_metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.summary.write_text(json.dumps(record, indent=2))


class AttentionProgress(L.Callback):
    """A measure that moves while the loss is flat: at every validation, how much the evaluated
    query attends to the tokens a two-hop circuit must read, on ``n`` fixed ID text prompts.

    Per layer l (mean over prompts, then the best head), the attention from the query position to
    the queried object's context colour (``attn/ctx_color_l{l}``) and context shape
    (``attn/ctx_shape_l{l}``), and to the association of its shape (``attn/assoc_shape_l{l}``,
    ``attn/assoc_item_l{l}``); chance for each is about 1 / (prompt length). The largest over
    layers is also written (``attn/<target>_max``). Added to ``metrics.jsonl`` and TensorBoard.
    """

    def __init__(self, n: int = 128) -> None:
        self.n = int(n)
        self._batch = None  # the fixed prompts, collated once

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        text = getattr(trainer.datamodule, "data", {}).get("text")
        if text is None or not hasattr(text, "task"):
            return
        if self._batch is None:
            batch = text.eval_batches(text.task.splits[0])[0]
            self._batch = batch.to(pl_module.device).rows(torch.arange(min(self.n, len(batch))))
        values = attention_to_targets(pl_module.model, self._batch)
        pl_module.last_val_metrics.update(values)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_scalar"):
            for key, value in values.items():
                experiment.add_scalar(key, value, trainer.global_step)


@torch.no_grad()
def attention_to_targets(model, batch) -> dict[str, float]:
    """``attn/<target>_l<l>`` and ``attn/<target>_max`` of :class:`AttentionProgress` for ``batch``."""
    was_training = model.training
    model.eval()
    try:
        stream = model.embed(batch)
        stream.extra["patterns"] = patterns = []
        h = stream.h
        for layer in range(model.n_layers):
            h = model.block(layer, stream.with_h(h))
    finally:
        model.train(was_training)
    rows = torch.arange(len(batch), device=batch.tokens.device)
    q = batch.objects["query_object"]
    order = batch.objects["association_order"]
    assoc = (order == q[:, None]).float().argmax(1)
    keys = {
        "ctx_color": batch.roles["context_color"][rows, q],
        "ctx_shape": batch.roles["context_shape"][rows, q],
        "assoc_shape": batch.roles["association_shape"][rows, assoc],
        "assoc_item": batch.roles["association_item"][rows, assoc],
    }
    out = {}
    for name, key in keys.items():
        # mean over prompts per head, then the best head: a max per prompt would pick whichever
        # head happens to hit the target and read chance-level attention as a lookup
        per_layer = [float(p[rows, :, batch.answer_pos, key].mean(0).amax()) for p in patterns]
        out.update({f"attn/{name}_l{l}": round(v, 6) for l, v in enumerate(per_layer)})
        out[f"attn/{name}_max"] = round(max(per_layer), 6)
    return out

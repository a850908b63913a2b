"""Training throughput: the lab's Lightning loop against a plain PyTorch loop doing the same work.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --model tiny --steps 150 --batch-size 64 --repeats 3

Both loops train the same model class (``conf/model/<model>.yaml``, same seed, same initial weights)
with the lab's AdamW + warm-up/cosine schedule (``TrainingModule.configure_optimizers``) on the same
batches (the ``StepBatches`` stream of a ``TextDataModule``, through the same DataLoader), for the
same number of steps. Variants:

- ``plain``: a hand-written loop: forward, cross-entropy, backward, optimizer and scheduler step.
- ``lightning-lab``: ``Trainer.fit`` on the lab's ``TrainingModule`` with the lab's trainer
  config (``conf/trainer/<cpu|gpu>.yaml``: precision, determinism, ``log_every_n_steps``,
  progress bar) and the lab's TensorBoard logger; the module logs train/loss, train/acc, train/lr
  every step as in training. Validation and checkpointing are off: they are scheduled work (every
  ``train.val_every`` steps), not per-step overhead.
- ``lightning-nobar`` and ``lightning-bare`` (``--bare``): the same without the progress bar, and
  without logger and progress bar, to attribute any overhead.

Timing starts after ``--warmup`` steps (allocator, autotuning, first-iteration costs) and stops
after the last step, so it covers data loading, forward, backward, optimizer and every per-step
hook. Variants alternate within each repeat; the table shows the median and the best repeat, and
on CPU also the median single-step CPU time over all repeats, the figure least disturbed by other
jobs on a shared machine.
After each pair of runs the final weights are compared: both loops must have done the same
arithmetic (exactly equal on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lab.data.datamodule import TextDataModule, to_device  # noqa: E402
from lab.models.backbone import Backbone  # noqa: E402
from lab.train.module import TrainingModule  # noqa: E402
from tasks.retrieval import RetrievalTask  # noqa: E402


def build(args):
    """Task, data module and a fresh module with the seeded initial weights."""
    task_cfg = OmegaConf.load(ROOT / "conf" / "task" / "retrieval.yaml")
    task = RetrievalTask(**{k: v for k, v in task_cfg.items() if k != "_target_"}, seed=0)
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    L.seed_everything(0, verbose=False)
    model = Backbone(len(task.vocab), **{k: v for k, v in model_cfg.items() if k != "_target_"})
    module = TrainingModule(model, lr=1e-3, warmup_steps=20, total_steps=args.steps)
    datamodule = TextDataModule(task, batch_size=args.batch_size)
    return task, datamodule, module


def clock() -> tuple[float, ...]:
    """(wall seconds, CPU seconds of this process (all threads), voluntary context switches)."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


class Stamps:
    """Clock readings at the end of steps ``warmup..steps``. On CPU every step is stamped (per-step
    times give a median step that ignores bursts from other jobs); on a GPU only the first and
    last, after a synchronize, so that timing does not serialise the queue."""

    def __init__(self, args, device: torch.device) -> None:
        self.warmup, self.steps, self.device = args.warmup, args.steps, device
        self.readings: list[tuple[float, ...]] = []

    def step_done(self, step: int) -> None:  # ``step`` optimizer steps are complete
        if step < self.warmup:
            return
        if self.device.type == "cuda":
            if step not in (self.warmup, self.steps):
                return
            torch.cuda.synchronize(self.device)
        self.readings.append(clock())

    def result(self) -> dict:
        first, last = self.readings[0], self.readings[-1]
        out = {"wall": last[0] - first[0], "cpu": last[1] - first[1], "switches": last[2] - first[2]}
        if len(self.readings) > 2:
            out["step_cpu"] = [b[1] - a[1] for a, b in zip(self.readings, self.readings[1:])]
        return out


class StepTimer(L.Callback):
    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.step_done(trainer.global_step)


def run_lightning(args, trainer_cfg: dict, device: torch.device, bar: bool = True, logger: bool = True):
    _, datamodule, module = build(args)
    stamps = Stamps(args, device)
    logdir = tempfile.TemporaryDirectory(prefix="throughput_tb_")
    options = dict(trainer_cfg)
    if not bar:
        options.update(enable_progress_bar=False)
    trainer = L.Trainer(
        **options,
        max_steps=args.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(logdir.name, name="", version="") if logger else False,
        callbacks=[StepTimer(stamps)],
    )
    with contextlib.ExitStack() as quiet:
        if not args.show_progress:  # the bar still updates (its cost is measured), just not on screen
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        trainer.fit(module, datamodule=datamodule)
    logdir.cleanup()
    assert trainer.global_step == args.steps
    return stamps.result(), module.model


def run_plain(args, trainer_cfg: dict, device: torch.device):
    _, datamodule, module = build(args)
    model = module.model.to(device).train()
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if str(trainer_cfg["precision"]).startswith("bf16")
        else contextlib.nullcontext()
    )
    stamps = Stamps(args, device)
    loader = iter(datamodule.train_dataloader())
    for step in range(args.steps):
        batch = to_device(next(loader), device)
        with autocast:
            logits = model.answer_logits(batch)
            loss = F.cross_entropy(logits, batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        stamps.step_done(step + 1)
    return stamps.result(), model


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float().cpu() - sb[k].float().cpu()).abs().max().item() for k in sa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from the timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bare", action="store_true", help="also time Lightning without progress bar / logger")
    parser.add_argument("--log-every-step", action="store_true",
                        help="Lightning variants call self.log on every step (the lab's behaviour before it "
                             "logged only on log_every_n_steps steps), to measure what that costs")
    parser.add_argument("--show-progress", action="store_true", help="let the progress bar draw (stderr)")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps")

    if args.log_every_step:
        TrainingModule._logging_step = lambda self: True
    device = torch.device(args.device)
    trainer_cfg = OmegaConf.to_container(
        OmegaConf.load(ROOT / "conf" / "trainer" / ("gpu.yaml" if device.type == "cuda" else "cpu.yaml"))
    )
    torch.use_deterministic_algorithms(bool(trainer_cfg.get("deterministic")))  # same for every variant
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    variants = ["plain", "lightning-lab"] + (["lightning-nobar", "lightning-bare"] if args.bare else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    diffs = []
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]  # alternate who goes first
        models = {}
        for variant in order:
            if variant == "plain":
                result, models[variant] = run_plain(args, trainer_cfg, device)
            else:
                result, models[variant] = run_lightning(
                    args, trainer_cfg, device, bar=variant == "lightning-lab", logger=variant != "lightning-bare"
                )
            runs[variant].append(result)
            print(f"  repeat {repeat + 1}/{args.repeats} {variant:15s} wall {result['wall']:7.3f} s  "
                  f"cpu {result['cpu']:7.3f} s  voluntary context switches {result['switches']:.0f}",
                  file=sys.stderr, flush=True)
        diffs.append(max_weight_diff(models["plain"], models["lightning-lab"]))

    n_timed = args.steps - args.warmup
    samples = args.batch_size * n_timed
    per_step = device.type != "cuda"
    print(f"\nmodel={args.model} device={device} batch={args.batch_size} steps={args.steps} (timed {n_timed}) "
          f"repeats={args.repeats} torch_threads={torch.get_num_threads()} precision={trainer_cfg['precision']} "
          f"log_every_n_steps={trainer_cfg['log_every_n_steps']}"
          f"{' self.log on every step' if args.log_every_step else ''}")
    print("samples/s over the timed steps: 'wall' elapsed, 'cpu' CPU time of the process (all threads)"
          + (", 'step' from the median CPU time of a single step over all repeats (robust to other jobs)"
             if per_step else ""))
    header = f"{'variant':16s} {'wall median':>12s} {'wall best':>10s} {'cpu median':>11s} {'cpu best':>9s}"
    print(header + (f" {'step':>8s} {'step ms':>8s}" if per_step else ""))
    rates = {}
    for variant in variants:
        wall = [r["wall"] for r in runs[variant]]
        cpu = [r["cpu"] for r in runs[variant]]
        rates[variant] = [samples / statistics.median(wall), samples / min(wall),
                          samples / statistics.median(cpu), samples / min(cpu)]
        line = f"{variant:16s} " + " ".join(f"{r:{w}.1f}" for r, w in zip(rates[variant], (12, 10, 11, 9)))
        if per_step:
            step = statistics.median([t for r in runs[variant] for t in r["step_cpu"]])
            rates[variant].append(args.batch_size / step)
            line += f" {rates[variant][-1]:8.1f} {1000 * step:8.2f}"
        print(line)
    names = ["wall median", "wall best", "cpu median", "cpu best", "step"]
    for variant in variants[1:]:
        over = [100 * (p / l - 1) for p, l in zip(rates["plain"], rates[variant])]
        print(f"overhead {variant} (plain/lightning - 1): " + ", ".join(f"{n} {o:+.1f}%" for n, o in zip(names, over)))
    print(f"max |weight difference| plain vs lightning-lab after {args.steps} steps: {max(diffs):.3g}")

if __name__ == "__main__":
    main()

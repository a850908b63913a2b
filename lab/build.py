"""The one place a config becomes objects: task, data streams, model and objectives.

Training (new and resumed runs), evaluation of a run directory, standalone evaluation and encoder
pretraining all build through here, so a run is rebuilt the same way wherever it is loaded.
Models and data modules know nothing of run configs; only this module reads them.

Imports flow one way: tasks -> data -> models -> train / eval -> build -> entry points.

    cfg ──build_task──> task ──build_streams──> {stream name: data module}   (text, image, ...)
        ──build_model──> model (Backbone, wrapped with a visual encoder when a stream draws images)
        ──build_objectives──> {part name: objective}  (conf/objective/)
        ──build_training──> (task, CurriculumDataModule, TrainingModule, PhaseController)
    run dir ──load_trained──> (cfg, task, model in eval mode, checkpoint step)
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from lab import runs
from lab.data.curriculum import CurriculumDataModule
from lab.errors import LabError, unwrap_instantiation
from lab.models.interface import ResidualModel
from lab.models.lora import is_adapter_parameter
from lab.models.visual import Projector, VisionTextModel, build_encoder, check_encoder_name
from lab.train import encoder_pretrain
from lab.train.encoder_pretrain import encoder_arguments  # noqa: F401 - the builder's config -> encoder arguments step
from lab.train.module import TrainingModule
from lab.train.objectives import step_window
from lab.train.regime import PhaseController, match_steps, parse_regime, phase_lr_factor
from tasks.protocol import TaskConfigError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ generic
def build(node: DictConfig, what: str, **kwargs):
    """``instantiate`` with config errors turned into one clear :class:`LabError`."""
    try:
        return instantiate(node, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised below unless it is a config error
        cause = unwrap_instantiation(error)
        if isinstance(cause, (LabError, TaskConfigError)):
            raise LabError(str(cause)) from None
        if isinstance(cause, (TypeError, InstantiationException)):
            raise LabError(f"cannot build the {what} from its config: {cause}") from None
        raise


# --------------------------------------------------------------------------------------- task
def build_task(cfg: DictConfig):
    """The run's task (``cfg.task``), seeded with ``cfg.seed``."""
    return build(cfg.task, "task", seed=cfg.get("seed", 0))


# ------------------------------------------------------------------------------------ streams
def stream_nodes(cfg: DictConfig) -> list[DictConfig]:
    """The data-stream configs of a run: the primary ``cfg.modality`` plus those its regime names."""
    regime = cfg.get("regime") or {}
    return [cfg.modality, *((regime.get("data") or {}).values())]


def is_image_node(node) -> bool:
    """Whether a stream config builds an :class:`~lab.data.image.ImageDataModule`."""
    return node is not None and str(node.get("_target_", "")).endswith("ImageDataModule")


def uses_images(cfg: DictConfig) -> bool:
    """Whether any stream of the run draws images (its model then carries a visual encoder)."""
    return any(is_image_node(node) for node in stream_nodes(cfg) if node is not None)


def build_streams(cfg: DictConfig, task, model=None, batch_size: int = 1, eval_batch_size: int = 256):
    """One data module per stream, text first, and the primary stream's name. Image streams get
    ``model``'s visual encoder (features of a frozen encoder are computed once and cached)."""
    streams = {}
    primary = None
    for node in stream_nodes(cfg):
        extra = {}
        if is_image_node(node):
            if not isinstance(model, VisionTextModel):
                raise LabError("an image stream needs the run model to carry a visual encoder (lab.build.build_model)")
            extra = {"encoder": model.encoder, "frozen": model.frozen}
        data = build(node, "data stream", task=task, batch_size=batch_size, eval_batch_size=eval_batch_size, **extra)
        primary = primary or data.modality
        streams.setdefault(data.modality, data)
    return dict(sorted(streams.items(), key=lambda kv: kv[0] != "text")), primary


# -------------------------------------------------------------------------------------- model
def build_model(cfg: DictConfig, task, load_encoder_weights: bool = True) -> ResidualModel:
    """The run's model: ``cfg.model`` sized for the task's vocabulary, plus a visual encoder and
    projector when a stream draws images. ``load_encoder_weights=False`` skips fetching (or
    pretraining) encoder weights, for when a run checkpoint that holds them is loaded next."""
    if cfg.model.get("token_shift") == "associations" and not _has_role(task, "ctx_end"):
        raise LabError(f"model.token_shift=associations acts from the prompt's [CTX_END] on, but task {task.name!r} "
                       "has no [CTX_END] segment; use model.token_shift=true or false (or task=retrieval)")
    backbone = build(cfg.model, "model", vocab_size=len(task.vocab))
    longest = task.max_prompt_len
    if getattr(backbone, "max_len", longest) < longest:
        raise LabError(f"model.max_len={backbone.max_len} is shorter than the longest prompt ({longest} tokens); raise it")
    if cfg.get("adapter"):
        backbone = build(cfg.adapter, "adapter", model=backbone)
    if not uses_images(cfg):
        return backbone
    return build_vision_model(cfg, backbone, task, load_encoder_weights)


def _has_role(task, role: str) -> bool:
    """Whether the task's prompts carry the token role ``role`` (read off its first training sample)."""
    sample = task.train_batch(0, 1)[0]
    return bool(getattr(sample, "roles", dict)().get(role))


def init_from_run(model, source: str | Path, task) -> int:
    """Load the weights of a trained run (its ``last.ckpt``, or a checkpoint path) into ``model``,
    for fine-tuning or a curriculum across tasks; the run's vocabulary must be this task's, token for
    token (another task is accepted then, e.g. ``task=one_hop`` -> ``task=retrieval``). Adapter parameters the run
    lacks keep their initial values (LoRA's B = 0: the model starts equal to the trained one).
    Returns the checkpoint's step."""
    source = Path(source)
    if not source.exists():
        raise LabError(f"init_from={source} does not exist; pass a run directory written by train.py (or a .ckpt of one)")
    path = runs.checkpoint_path(source, "last") if source.is_dir() else source
    checkpoint = runs.load_checkpoint(path)
    runs.check_checkpoint_matches(checkpoint, task, path, same_task=False)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    target = model
    if isinstance(model, VisionTextModel) and not any(k.startswith("backbone.") for k in state):
        # a text-only run starts an image run: its weights are the language model's; the encoder
        # and projector keep theirs (the pretrained encoder, a fresh projector)
        target = model.backbone
        log.info("init_from=%s is a text-only run: it initialises the language model; the projector starts fresh", source)
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise LabError(f"init_from={source}: its weights do not fit this model ({runs.one_line(error, 300)}); "
                       "use the same model settings as that run") from None
    missing = [k for k in missing if not is_adapter_parameter(k)]
    if missing or unexpected:
        raise LabError(f"init_from={source}: its weights do not fit this model (missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}); use the same model settings as that run")
    return int(checkpoint.get("global_step", 0))


def prepare_encoder(cfg: DictConfig) -> None:
    """The step before an image run trains: pretrain its visual encoder offline (``encoder.weights=lab``,
    minutes on a CPU, with progress in the log) unless a cached copy exists. Announced, not hidden
    in model building: :func:`build_model` only reads the cached weights."""
    if not uses_images(cfg) or str(cfg.encoder.get("weights") or "lab") != "lab":
        return
    if not encoder_pretrain.pretrained_encoder_path(cfg, must_exist=False).is_file():
        log.info("before training: pretraining the visual encoder %s (encoder.pretrain.steps=%s); cached for later runs",
                 cfg.encoder.name, cfg.encoder.pretrain.steps)
    encoder_pretrain.ensure_pretrained_encoder(cfg)


def build_vision_model(cfg: DictConfig, backbone, task, load_weights: bool = True) -> VisionTextModel:
    """``backbone`` + the visual encoder of ``cfg.encoder`` (weights from ``encoder.weights``) + projector."""
    from tasks.image_retrieval import image_prompt_len
    from tasks.render import Renderer
    from tasks.vocab import IMG

    enc = cfg.get("encoder")
    if enc is None:
        raise LabError("an image run needs an encoder: add encoder=<name> (see conf/encoder/)")
    # A canvas too small for the task is refused before any encoder pretraining.
    Renderer(task.n_colors, task.n_shapes, max_objects=task.max_objects, **encoder_pretrain.render_settings(cfg))
    check_encoder_name(str(enc.name))
    weights = str(enc.get("weights") or "lab")
    if not load_weights:
        weights = "random"
    elif weights == "lab":
        weights = str(encoder_pretrain.pretrained_encoder_path(cfg))  # prepare_encoder trained it, or it says how
    encoder = build_encoder(**encoder_arguments(enc), weights=weights)
    longest = image_prompt_len(task, encoder.n_tokens)
    if getattr(backbone, "max_len", longest) < longest:
        raise LabError(
            f"image prompts take up to {longest} tokens ({encoder.n_tokens} image tokens) but model.max_len="
            f"{backbone.max_len}; raise model.max_len or use an encoder with fewer tokens"
        )
    std = enc.get("projector_init_std")
    projector = Projector(encoder.dim, int(backbone.d_model), str(enc.get("projector") or "mlp"),
                          out_std=None if std is None else float(std))
    return VisionTextModel(backbone, encoder, projector, task.vocab[IMG], frozen=bool(enc.get("frozen", True)))


# --------------------------------------------------------------------------------- objectives
def build_objectives(cfg: DictConfig, model, task) -> dict:
    """The objective parts of ``cfg.objective`` with a weight > 0, built with ``model`` and ``task``."""
    parts = {}
    for name, node in (cfg.get("objective") or {}).items():
        if node is None:
            continue
        weight = node.get("weight", 1.0)
        if weight is None or float(weight) < 0:
            raise LabError(f"objective.{name}.weight must be >= 0, got {weight}")
        if float(weight) == 0:
            _warn_unused_task_option(name, node, task)
            continue
        try:
            part_class = get_class(str(node.get("_target_")))
        except Exception:  # noqa: BLE001 - any import failure means a wrong _target_
            raise LabError(f"objective.{name}._target_={node.get('_target_')!r} is not an importable class") from None
        if getattr(part_class, "needs_intermediate", False) and not getattr(task, "has_intermediate", True):
            log.warning("objective.%s is left out: task %s has no intermediate variable", name, task.name)
            continue
        option = getattr(part_class, "task_option", None)
        if option and not getattr(task, option, 0):
            log.info("objective.%s is left out: task.%s is 0 (nothing for it to train)", name, option)
            continue
        if getattr(part_class, "needs_images", False) and not uses_images(cfg):
            raise LabError(f"objective.{name} needs image data (modality=image or an image regime)")
        parts[name] = build(node, f"objective {name!r}", model=model, task=task)
    if not parts:
        raise LabError("every objective has weight 0; give objective.answer.weight a value > 0")
    if all(part.anneal is not None for part in parts.values()):
        end = max(part.anneal[1] for part in parts.values())
        raise LabError(f"every objective fades out (by step {end}), so training would stop learning there; "
                       "give objective.answer.weight a value > 0 (without anneal)")
    return parts


def _warn_unused_task_option(name: str, node, task) -> None:
    """A part that is off while the task setting it trains is on: that setting lengthens prompts for nothing."""
    try:
        option = getattr(get_class(str(node.get("_target_"))), "task_option", None)
    except Exception:  # noqa: BLE001 - a part that is off is never built, so a wrong _target_ does not matter
        return
    if option and getattr(task, option, 0):
        log.warning("task.%s > 0 but objective.%s is off: the queries lengthen prompts and train nothing", option, name)


# ----------------------------------------------------------------------------------- training
def init_source(cfg: DictConfig) -> str | None:
    """The run whose weights a new run starts from (``init_from``); ``none`` means from scratch."""
    source = cfg.get("init_from")
    return None if source is None or str(source).lower() == "none" else str(source)


def check_fine_tune_source(cfg: DictConfig) -> None:
    """A fine-tuning preset (``train.requires_init_from``) or adapters need a trained model to start
    from; ``init_from=none`` asks for the from-scratch control explicitly."""
    missing = cfg.train.get("requires_init_from", False) and cfg.get("init_from") is None
    if missing or (cfg.get("adapter") and cfg.get("init_from") is None):
        what = "this preset fine-tunes a trained model" if missing else "adapter= trains adapters on a frozen model"
        raise LabError(f"{what}, but no init_from was given; pass init_from=<pretraining run dir> (e.g. a run of "
                       "experiment=fewshot_pretrain), or init_from=none to start from random weights on purpose")


def run_setting(cfg: DictConfig) -> dict:
    """What a recipe's ``measured_on`` is compared with: the contexts (text, or image for
    ``modality=image``) and the model's depth."""
    contexts = "image" if str(cfg.modality.get("_target_", "")).endswith("ImageDataModule") else "text"
    return {"contexts": contexts, "n_layers": cfg.model.get("n_layers")}


def recipes_measured_on(setting: dict) -> list[str]:
    """Names of the recipes (conf/recipe/) measured on ``setting``."""
    from omegaconf import OmegaConf

    from lab.overrides import CONF_DIR

    names = []
    for path in sorted((CONF_DIR / "recipe").glob("*.yaml")):
        measured = (OmegaConf.load(path).get("recipe") or {}).get("measured_on")
        if measured is not None and all(setting.get(k) == v for k, v in measured.items()):
            names.append(path.stem)
    return names


def check_recipe(cfg: DictConfig) -> None:
    """Refuse a recipe outside the setting its aids were measured on (``recipe.measured_on``),
    naming the recipes that were; ``recipe.measured_on=null`` trains with it anyway."""
    recipe = cfg.get("recipe") or {}
    measured = recipe.get("measured_on")
    if not measured:
        return
    setting = run_setting(cfg)
    differs = {k: setting.get(k) for k, v in measured.items() if setting.get(k) != v}
    if not differs:
        return
    here = ", ".join(f"{k}={v}" for k, v in differs.items())
    there = ", ".join(f"{k}={v}" for k, v in measured.items())
    fits = recipes_measured_on(setting)
    advice = f"use recipe={' or recipe='.join(fits)}" if fits else "no recipe was measured there: use recipe=plain"
    raise LabError(f"recipe={recipe.get('name')} was measured on {there}, but this run has {here}; {advice}, "
                   "or pass recipe.measured_on=null to train with it anyway (unmeasured)")


def check_train_settings(cfg: DictConfig) -> None:
    check_fine_tune_source(cfg)
    check_recipe(cfg)
    t = cfg.train
    checks = [
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
        (t.val_every >= 1, f"train.val_every must be >= 1, got {t.val_every}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (0 < t.stop.threshold <= 1, f"train.stop.threshold must be in (0, 1], got {t.stop.threshold}"),
        (0 < t.stop.image_threshold <= 1, f"train.stop.image_threshold must be in (0, 1], got {t.stop.image_threshold}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LabError(message)
    if step_window(t.get("shift_fade"), "train.shift_fade") is not None:
        if not cfg.model.get("token_shift"):
            raise LabError("train.shift_fade fades the token shift, but model.token_shift is false; "
                           "set model.token_shift=true (or associations), or drop train.shift_fade")


def build_training(cfg: DictConfig, run_dir: str | Path = "."):
    """(task, datamodule, module, controller) of a training run, every setting checked first."""
    check_train_settings(cfg)
    task = build_task(cfg)
    prepare_encoder(cfg)
    model = build_model(cfg, task)
    source = init_source(cfg)
    if source:
        step = init_from_run(model, source, task)
        log.info("initialised from %s (step %d)", source, step)
        source_seed = runs.load_config(source).get("seed", 0) if Path(source).is_dir() else None
        if source_seed is not None and int(source_seed) != int(cfg.get("seed", 0)):
            log.warning("init_from=%s was trained with seed=%s but this run has seed=%s: the task is seeded by it "
                        "(the few-shot benchmark's rules, for one), so pass seed=%s to fine-tune on the same task",
                        source, source_seed, cfg.get("seed"), source_seed)
    streams, primary = build_streams(cfg, task, model, cfg.train.batch_size, cfg.train.eval_batch_size)
    regime = parse_regime(cfg, primary, list(streams))
    if cfg.regime.get("match_steps_of"):
        regime = match_steps(regime, cfg.regime.match_steps_of, cfg.train.val_every)
    controller = PhaseController(regime, run_dir, cfg.train.stop.threshold, cfg.train.stop.patience)
    datamodule = CurriculumDataModule(streams, controller, cfg.seed)
    module = TrainingModule(
        model,
        objectives=build_objectives(cfg, model, task),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        betas=cfg.train.betas,
        lr_factor=phase_lr_factor(controller, cfg.train.warmup_steps, cfg.train.lr),
        val_names=datamodule.val_names,
        decoder=task.vocab.decode,
        meta=runs.checkpoint_meta(task),
        shift_fade=cfg.train.get("shift_fade"),
    )
    regime.best_monitor = cfg.train.stop.monitor or regime.phases[-1].until or f"val/{primary}_id_acc"
    monitors = [f"val/{n}_acc" for n in datamodule.val_names]
    for where, metric in [("train.stop.monitor", regime.best_monitor)] + [
        (f"phase {p.name!r} until", p.until) for p in regime.phases if p.until
    ]:
        if metric not in monitors:
            raise LabError(f"{where}={metric!r} is not a validation metric; choose one of {monitors}")
    log.info("regime %s: %s", regime.name, " -> ".join(f"{p.name}{p.mix}" for p in regime.phases))
    return task, datamodule, module, controller


# ------------------------------------------------------------------------------- trained runs
def load_trained(run_dir: str | Path, which: str = "best"):
    """Rebuild (cfg, task, model in eval mode on CPU, checkpoint step) from a run directory."""
    cfg = runs.load_config(run_dir)
    task = build_task(cfg)
    path = runs.checkpoint_path(run_dir, which)
    checkpoint = runs.load_checkpoint(path)
    runs.check_checkpoint_matches(checkpoint, task, path)
    model = build_model(cfg, task, load_encoder_weights=False)  # the checkpoint holds the encoder's weights
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise LabError(
            f"{path} does not fit the model described by {run_dir}/{runs.CONFIG_FILE}: {runs.one_line(error, 300)}"
        ) from None
    return cfg, task, model.eval(), int(checkpoint.get("global_step", 0))

"""Image-phase vs text-phase training step time for the same backbone.

    OMP_NUM_THREADS=1 python benchmarks/image_step_time.py [hydra overrides, e.g. encoder=vit model=paper]

Builds the run's model exactly as ``train.py modality=image`` does (backbone + frozen encoder +
projector), then times ``steps`` optimizer steps on text batches and on image batches (batch
creation included; the one-off feature-cache build of the image pool is reported separately).
Target: image step time within 2x of text.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.build import build_model, build_task, prepare_encoder  # noqa: E402
from lab.data.datamodule import TextDataModule  # noqa: E402
from lab.data.image import ImageDataModule  # noqa: E402


def time_steps(model, get_batch, steps: int, warmup: int = 3) -> tuple[float, float]:
    """Mean seconds per step: (data, forward+backward+update)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    data_t = comp_t = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = get_batch(i)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model.answer_logits(batch), batch["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            data_t += t1 - t0
            comp_t += t2 - t1
    return data_t / steps, comp_t / steps


def main(argv: list[str]) -> None:
    steps = 30
    overrides = []
    for arg in argv:
        if arg.startswith("steps="):
            steps = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["modality=image", *overrides])
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    prepare_encoder(cfg)  # pretrains the encoder once if it is not cached
    model = build_model(cfg, task)  # modality=image: backbone + the lab-pretrained encoder
    bs = int(cfg.train.batch_size)
    text = TextDataModule(task, bs, bs)
    node = cfg.modality
    image = ImageDataModule(task, bs, bs, encoder=model.encoder, frozen=model.frozen, render=cfg.render,
                            pool_size=int(node.pool_size), feature_cache_dir=None)
    t0 = time.perf_counter()
    for n in range(task.id_objects[0], task.id_objects[1] + 1):
        image.group(f"pool_{n}", features=model.frozen)
    cache_s = time.perf_counter() - t0
    text_d, text_c = time_steps(model, text.train_batch, steps)
    img_d, img_c = time_steps(model, image.train_batch, steps)
    text_len = text.train_batch(0)["tokens"].shape[1]
    img_len = image.train_batch(0)["tokens"].shape[1]
    print("command: OMP_NUM_THREADS=%s python benchmarks/image_step_time.py %s" % (
        torch.get_num_threads(), " ".join(argv)))
    print(f"encoder {cfg.encoder.name} (layer {cfg.encoder.layer}, frozen={model.frozen}): {image.n_image_tokens} image "
          f"tokens x {model.encoder.dim}; backbone {model.n_layers} layers x {model.backbone.d_model}; batch {bs}; "
          f"{steps} timed steps")
    print(f"one-off feature cache of the training pool ({image.images.pool_size} pictures x "
          f"{task.id_objects[1] - task.id_objects[0] + 1} object counts): {cache_s:.1f} s")
    print(f"text  step: {1000 * (text_d + text_c):7.1f} ms  (data {1000 * text_d:.1f} ms, model {1000 * text_c:.1f} ms), "
          f"sequence length {text_len}")
    print(f"image step: {1000 * (img_d + img_c):7.1f} ms  (data {1000 * img_d:.1f} ms, model {1000 * img_c:.1f} ms), "
          f"sequence length {img_len}")
    print(f"image / text: {(img_d + img_c) / (text_d + text_c):.2f}x  (target: <= 2x)")


if __name__ == "__main__":
    main(sys.argv[1:])

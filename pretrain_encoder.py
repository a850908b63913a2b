"""Pretrain a visual encoder offline: ``python pretrain_encoder.py encoder=resnet``.

Writes ``checkpoints/encoders/<name>-<hash>/encoder.safetensors``, which image runs with
``encoder.weights=lab`` (the default) use. All logic lives in ``lab/train/encoder_pretrain.py``.
"""
import hydra
from omegaconf import DictConfig

from lab.cli import user_errors_exit
from lab.train.encoder_pretrain import run_pretraining


@hydra.main(config_path="conf", config_name="pretrain_encoder", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    run_pretraining(cfg)


if __name__ == "__main__":
    main()

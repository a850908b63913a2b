"""Train a model: ``python train.py task=retrieval modality=text model=tiny``.

All logic lives in ``lab/``; see ``conf/train.yaml`` for every option.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lab.cli import check_command_line, check_resume_argument, user_errors_exit


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    from lab.train.run import train  # after the command line is checked: mistakes are reported fast

    train(cfg, HydraConfig.get().runtime.output_dir, overrides=HydraConfig.get().overrides.task)


if __name__ == "__main__":
    check_resume_argument(sys.argv)
    check_command_line("train", sys.argv)
    main()

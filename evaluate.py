"""Evaluate a trained run: ``python evaluate.py run=<run dir> evaluators=[accuracy]``.

Results go to ``<run>/eval/<evaluator>.json|.csv|.png`` and TensorBoard.
"""
import sys

import hydra
from omegaconf import DictConfig

from lab.cli import check_command_line, user_errors_exit


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    from lab.eval.run import evaluate_run  # after the command line is checked: mistakes are reported fast

    evaluate_run(cfg)


if __name__ == "__main__":
    check_command_line("evaluate", sys.argv)
    main()

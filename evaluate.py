"""Evaluate a trained run: ``python evaluate.py run=<run dir> evaluators=[accuracy]``.

Results go to ``<run>/eval/<evaluator>.json|.csv|.png`` and TensorBoard.
"""
import hydra
from omegaconf import DictConfig

from lab.cli import user_errors_exit
from lab.eval.run import evaluate_run


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate_run(cfg)


if __name__ == "__main__":
    main()

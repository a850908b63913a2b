"""Export a trained run as a Hugging Face model: ``python export.py run=<run dir> out=<new folder>``.

Writes a GPT-NeoX folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads;
all logic lives in ``lab/export/``, options in ``conf/export.yaml``, the guide in docs/interop.md.
"""
import sys

import hydra
from omegaconf import DictConfig

from lab.cli import check_command_line, user_errors_exit
from lab.errors import LabError


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    from lab.export.folder import export_run  # after the command line is checked: mistakes are reported fast

    if not cfg.get("run"):
        raise LabError("pass the run directory to export: run=checkpoints/<task>/<run>")
    export_run(cfg.run, cfg.out, str(cfg.checkpoint), text_only=bool(cfg.text_only), tolerance=float(cfg.tolerance))


if __name__ == "__main__":
    check_command_line("export", sys.argv)
    main()

"""Aggregate runs into a table: ``python aggregate.py checkpoints/retrieval/<sweep> --out <file.md>``."""
from lab.cli import user_errors_exit
from lab.results import main

if __name__ == "__main__":
    user_errors_exit(main)()

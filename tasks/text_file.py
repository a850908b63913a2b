"""Next-token-accuracy evaluation data from a local text file (for Hugging Face models).

The file is tokenized once, then cut into windows of ``seq_len + 1`` tokens taken every
``stride`` tokens (default: ``seq_len``): the first ``seq_len`` tokens are the prompt and the
model must predict the last one (answer position = the last prompt token). So every evaluator
written for the lab's tasks (answer logits vs target) runs unchanged.

Tokenization (``tokenizer=``):

- ``hf``: the Hugging Face tokenizer saved in the model folder (no special tokens added);
- ``bytes``: UTF-8 bytes, token id = byte value (needs a vocabulary of >= 256 tokens);
- ``chars``: the file's distinct characters in sorted order get ids 0..n-1 (needs a vocabulary
  of at least that many tokens; meant for tiny random models and tests);
- ``auto`` (default): ``hf`` if the model folder has a tokenizer, else ``bytes`` if the
  vocabulary has >= 256 tokens, else ``chars``.

The task has a single split, ``text``. Its chance accuracy r is the majority baseline: the
share of the most frequent target token among the samples considered.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path


from tasks.protocol import TaskConfigError

TOKENIZERS = ("auto", "hf", "bytes", "chars")


@dataclass
class TextSample:
    tokens: list[int]
    answer: int
    n_objects: int = 0


def tokenize(text: str, mode: str, tokenizer, vocab_size: int) -> tuple[list[int], str]:
    if mode not in TOKENIZERS:
        raise TaskConfigError(f"data.tokenizer={mode!r} is unknown; choose one of {TOKENIZERS}")
    if mode == "auto":
        mode = "hf" if tokenizer is not None else ("bytes" if vocab_size >= 256 else "chars")
    if mode == "hf":
        if tokenizer is None:
            raise TaskConfigError("data.tokenizer=hf but the model folder has no tokenizer; use bytes or chars")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif mode == "bytes":
        ids = list(text.encode("utf-8"))
    else:
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        ids = [index[c] for c in text]
    if ids and max(ids) >= vocab_size:
        raise TaskConfigError(
            f"the {mode} tokenization of the text file needs {max(ids) + 1} token ids but the model's "
            f"vocabulary has {vocab_size}; choose another data.tokenizer"
        )
    return ids, mode


class TextFileTask:
    """Next-token prediction windows from a text file (see module docstring)."""

    name = "text_file"
    splits = ("text",)
    id_objects = (0, 0)

    def __init__(self, path, seq_len: int = 64, stride: int | None = None, n_samples: int = 512,
                 tokenizer: str = "auto", hf_tokenizer=None, vocab_size: int = 2**31) -> None:
        path = Path(path)
        if not path.is_file():
            raise TaskConfigError(f"data.text_file={str(path)!r} does not exist; pass a local UTF-8 text file")
        if seq_len < 1 or n_samples < 2 or (stride is not None and stride < 1):
            raise TaskConfigError("data.seq_len and data.stride must be >= 1 and data.n_samples >= 2")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise TaskConfigError(f"{path} is not UTF-8 text ({error})") from None
        self.ids, self.tokenizer = tokenize(text, tokenizer, hf_tokenizer, vocab_size)
        self.seq_len, self.stride = int(seq_len), int(stride or seq_len)
        starts = range(0, len(self.ids) - self.seq_len, self.stride)
        self.samples = [
            TextSample(self.ids[s : s + self.seq_len], self.ids[s + self.seq_len]) for s in list(starts)[:n_samples]
        ]
        if len(self.samples) < 2:
            raise TaskConfigError(
                f"{path} has {len(self.ids)} tokens: too short for windows of {self.seq_len + 1}; "
                "lower data.seq_len or use a longer file"
            )

    def eval_set(self, split: str, noise: bool = False) -> list[TextSample]:
        if split not in self.splits:
            raise TaskConfigError(f"unknown split {split!r}; the text-file task has {self.splits}")
        return self.samples

    def chance_accuracy(self, samples) -> float:
        counts = Counter(s.answer for s in samples)
        return max(counts.values()) / len(samples) if samples else 0.0

"""The lab's token vocabulary as a Hugging Face tokenizer: one word per token, split on
whitespace, ids equal to the lab's (``"[BOS] color_3 shape_1"`` -> the lab's ids of those
three tokens). It adds nothing by itself: prompts carry their own ``[BOS]``."""
from __future__ import annotations

import json
from pathlib import Path

from lab.errors import LabError
from tasks.vocab import BOS, PAD

# tokenizer_class in tokenizer_config.json: understood by transformers 4.x and 5.x alike
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def build_tokenizer(tokens: list[str], max_len: int):
    """A fast tokenizer whose ids are the positions of ``tokens``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bad = [t for t in tokens if not t or any(c.isspace() for c in t)]
    if bad:
        raise LabError(f"vocabulary tokens {bad[:3]} are empty or hold whitespace; a word-level tokenizer cannot spell them")
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {name: token for name, token in (("pad_token", PAD), ("bos_token", BOS)) if token in tokens}
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_len, **special)


def save_tokenizer(tokens: list[str], max_len: int, folder: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    build_tokenizer(tokens, max_len).save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2) + "\n")

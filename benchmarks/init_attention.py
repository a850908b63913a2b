"""How sharp attention is at initialisation, per ``model.init``: the standard deviation of the
attention logits q.k/sqrt(d_head) in block 0 and the largest attention weight of a query, on one
training batch of the retrieval task (docs/learning.md, "Why the initialisation matters").

    python benchmarks/init_attention.py [--d_model 128 --n_heads 4 --seed 0]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab.data.datamodule import TextDataModule  # noqa: E402
from lab.models.backbone import INITS, Backbone  # noqa: E402
from tasks.retrieval import RetrievalTask  # noqa: E402


@torch.no_grad()
def attention_at_init(init: str, batch, vocab_size: int, d_model: int, n_heads: int, seed: int) -> tuple[float, float]:
    """(logit std, mean over queries past position 10 of the largest attention weight) in block 0."""
    torch.manual_seed(seed)
    model = Backbone(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, d_ff=4 * d_model, init=init).eval()
    stream = model.embed(batch)
    stream.extra["patterns"] = patterns = []
    attn = model.blocks[0].attn
    x = model.blocks[0].ln1(stream.h)
    q, k, _ = attn.qkv(x).view(*x.shape[:2], 3, n_heads, d_model // n_heads).permute(2, 0, 3, 1, 4)
    mask = stream.extra["mask"].expand(-1, n_heads, -1, -1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d_model // n_heads)  # before RoPE, as the qkv map writes them
    model.block(0, stream)
    return float(logits[mask].std()), float(patterns[0].amax(-1)[..., 10:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = RetrievalTask(seed=args.seed)
    batch = TextDataModule(task, batch_size=64).train_batch(0)
    print("| init | logit std (block 0) | largest attention weight per query |\n|---|---|---|")
    for init in INITS:
        std, peak = attention_at_init(init, batch, len(task.vocab), args.d_model, args.n_heads, args.seed)
        print(f"| {init} | {std:.3f} | {peak:.3f} |")


if __name__ == "__main__":
    main()

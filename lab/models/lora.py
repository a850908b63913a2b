"""Low-rank adapters (LoRA, Hu et al. 2021) for the lab's own models, in plain PyTorch.

``add_lora(model, rank, alpha, targets)`` replaces every ``nn.Linear`` whose name ends with one of
``targets`` by a :class:`LoRALinear`: the same weight and bias (same parameter names, so a
checkpoint of the plain model loads into it), frozen, plus ``lora_a`` [r, in] and ``lora_b``
[out, r] with ``y = x W^T + b + (alpha / r) x A^T B^T``. B starts at zero, so the adapted model
starts equal to the plain one. Every other parameter of the model is frozen too: only the adapters
train. peft's LoRA would need the lab's models to look like Hugging Face ones; this is 40 lines.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lab.errors import LabError


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a trainable low-rank update; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = int(rank), float(alpha) / int(rank)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=("qkv", "proj")) -> nn.Module:
    """Put LoRA adapters on ``model``'s linear layers named ``*<target>`` and freeze everything else."""
    if rank < 1:
        raise LabError(f"adapter.rank must be >= 1, got {rank}")
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
             and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LabError(f"adapter.targets={list(targets)} match no linear layer of the model; its linear layers end in {linear}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return model


def is_adapter_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")

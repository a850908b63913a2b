"""Fold LoRA adapters into plain linear weights: ``W + (alpha / r) B A``, bias unchanged."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lab.models.lora import LoRALinear


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`LoRALinear` replaced by the ``nn.Linear`` it equals
    (``model`` itself when it has none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = getattr(parent, child)
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None,
                          device=lora.weight.device, dtype=lora.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(lora.weight + lora.scale * lora.lora_b @ lora.lora_a)
            if lora.bias is not None:
                plain.bias.copy_(lora.bias)
        setattr(parent, child, plain)
    return model

"""Probes (:mod:`lab.models.probe`) on Hugging Face decoder layers, for :class:`lab.models.hf.HFModel`.

- per-head writes: a pre-hook on the attention's output projection reads the head outputs
  (its input, [B, T, H * hd]) and applies each head's slice of the projection;
- block writes: forward hooks on the module whose output is the attention write (the output
  projection; OLMo-2's post-attention norm) and on the MLP (OLMo-2: its post-MLP norm);
- patterns and scaling: for one layer call the model's attention implementation is switched to
  ``lab_probe``, an eager attention (registered with transformers' ``AttentionInterface``)
  that computes the weights with :func:`lab.models.probe.scaled_softmax` and records them.

Everything is undone when the layer returns; nothing changes when nothing is asked.
"""
from __future__ import annotations

from contextlib import contextmanager

from lab.errors import LabError
from lab.models.probe import Probe, scaled_softmax

IMPLEMENTATION = "lab_probe"


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the layer's probe (``module._lab_probe``) applied; HF's signature."""
    probe: Probe = module._lab_probe
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: repeat the key/value heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = scaled_softmax(scores, probe.scale, probe.layer).to(value.dtype)
    probe.keep_patterns(weights)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, probe_attention)


def _path(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@contextmanager
def probing(model, layer: int, probe: Probe):
    """While a decoder layer runs: the hooks and attention implementation ``probe`` needs."""
    family, decoder = model.family, model.layers[layer]
    if "heads" in probe.record and family.post_norm:
        raise LabError(f"per-head writes are not defined for Hugging Face {model.model_type}: it normalises the "
                       "attention output after summing the heads, so their writes do not add up (record writes)")
    handles, writes = [], {}
    config = model.hf.config
    attention = _path(decoder, family.attn)
    if probe.slow and getattr(attention, "config", config) is not config:
        raise LabError(f"Hugging Face {model.model_type}: the attention layers do not share the model config, "
                       "so attention patterns and scaling cannot be switched on")
    previous = config._attn_implementation
    try:
        if "heads" in probe.record:
            projection = _path(decoder, family.attn_write)
            n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)

            def heads(module, args):
                x = args[0]
                probe.keep_heads(x.view(*x.shape[:-1], n_heads, -1), module.weight, module.bias, family.conv1d)

            handles.append(projection.register_forward_pre_hook(heads))
        if "writes" in probe.record:
            for name, path in (("attn", family.attn_write), ("mlp", family.mlp_write)):
                handles.append(_path(decoder, path).register_forward_hook(
                    lambda module, args, out, name=name: writes.__setitem__(name, out)))
        if probe.slow:
            _register()
            attention._lab_probe = probe
            config._attn_implementation = IMPLEMENTATION
        yield
        if "writes" in probe.record:
            probe.keep_writes(writes["attn"], writes["mlp"])
    finally:
        config._attn_implementation = previous
        attention.__dict__.pop("_lab_probe", None)
        for handle in handles:
            handle.remove()

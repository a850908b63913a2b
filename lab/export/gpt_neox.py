"""The lab's :class:`~lab.models.backbone.Backbone` as a Hugging Face ``GPTNeoXForCausalLM``,
weight for weight.

The backbone is a sequential (``use_parallel_residual=False``) GPT-NeoX decoder: pre-LN with
biases, exact GELU MLP, rotary embeddings over the whole head (``partial_rotary_factor=1``),
a final LayerNorm and an untied, bias-free unembedding. Three things differ only in layout:

- the fused QKV projection: the lab's rows are ``[q (all heads), k, v]``, GPT-NeoX's are
  ``[q_h, k_h, v_h]`` head by head;
- rotary pairs: the lab rotates adjacent dimensions ``(2i, 2i+1)`` by frequency i, GPT-NeoX
  rotates ``(i, i + d/2)``; reordering each head's query and key rows by
  :func:`rope_permutation` maps one onto the other exactly (q.k is unchanged by a common
  permutation, values are not permuted);
- ``pos_encoding=none`` becomes ``partial_rotary_factor=0`` (no dimension rotated).

What GPT-NeoX cannot express is refused by :func:`exportable_backbone`.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor, nn

from lab.errors import LabError
from lab.export.merge import merge_lora
from lab.models.backbone import Backbone, rope_cache
from lab.models.visual import VisionTextModel

log = logging.getLogger(__name__)

ROPE_BASE = float(inspect.signature(rope_cache).parameters["base"].default)


class ExportError(LabError):
    """A model that has no exact Hugging Face counterpart."""


def exportable_backbone(model: nn.Module, text_only: bool = False) -> Backbone:
    """The plain :class:`Backbone` to export (LoRA adapters merged), or :class:`ExportError`
    saying why the model cannot be exported and what to do."""
    if isinstance(model, VisionTextModel):
        if not text_only:
            raise ExportError(
                "this is an image run: its visual encoder and projector have no place in a GPT-NeoX model, so it is "
                "not exported; pass text_only=true to export its language model alone (text prompts only)")
        log.warning("text_only=true: exporting the language model only; image prompts need the lab's encoder and "
                    "projector, which are not exported")
        model = model.backbone
    model = merge_lora(model)
    if not isinstance(model, Backbone):
        raise ExportError(f"only the lab's Backbone can be exported, not {type(model).__name__}")
    if model.pos_encoding == "learned":
        raise ExportError("model.pos_encoding=learned: GPT-NeoX has no learned absolute positions, so the run is not "
                          "exported; train with model.pos_encoding=rope (or none)")
    if model.shift is not None and float(model.shift_scale) != 0.0:
        raise ExportError(
            f"model.token_shift={model.token_shift}: the token shift (a learned map of the previous token added to "
            "h_0) has no counterpart in GPT-NeoX, so the run is not exported; train without it (recipe=plain), "
            "or fade it out to 0 during training (train.shift_fade=[start,end])")
    for block in model.blocks:
        act = block.mlp[1]
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise ExportError(f"the MLP activation {act} is not the exact GELU GPT-NeoX uses")
    return model


def rope_permutation(head_dim: int) -> Tensor:
    """Index j of a GPT-NeoX head takes the lab's dimension ``perm[j]``: even dimensions first,
    then odd ones (the lab's pair (2i, 2i+1) becomes GPT-NeoX's pair (i, i + head_dim/2))."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _sizes(model: Backbone) -> dict:
    attn = model.blocks[0].attn
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportError(f"the model's LayerNorms use different eps values {sorted(eps)}; GPT-NeoX has one")
    return dict(vocab=model.tok_emb.num_embeddings, d_model=model.d_model, n_layers=model.n_layers,
                n_heads=attn.n_heads, head_dim=attn.head_dim, d_ff=model.blocks[0].mlp[0].out_features,
                eps=eps.pop())


def neox_config(model: Backbone, pad_id: int | None = None, bos_id: int | None = None):
    """The ``GPTNeoXConfig`` of ``model``'s architecture."""
    from transformers import GPTNeoXConfig

    s = _sizes(model)
    rotary = 1.0 if model.pos_encoding == "rope" else 0.0
    return GPTNeoXConfig(
        vocab_size=s["vocab"], hidden_size=s["d_model"], num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"], intermediate_size=s["d_ff"], hidden_act="gelu",
        max_position_embeddings=model.max_len, layer_norm_eps=s["eps"], use_parallel_residual=False,
        tie_word_embeddings=False, attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": rotary},
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=None, architectures=["GPTNeoXForCausalLM"],
    )


@torch.no_grad()
def neox_state_dict(model: Backbone) -> dict[str, Tensor]:
    """``model``'s weights under ``GPTNeoXForCausalLM``'s names and layout (see module docstring)."""
    s = _sizes(model)
    D, H, hd = s["d_model"], s["n_heads"], s["head_dim"]
    perm = rope_permutation(hd) if model.pos_encoding == "rope" else torch.arange(hd)
    out = {"gpt_neox.embed_in.weight": model.tok_emb.weight}
    for l, block in enumerate(model.blocks):
        p = f"gpt_neox.layers.{l}."
        w = block.attn.qkv.weight.reshape(3, H, hd, D).clone()
        b = block.attn.qkv.bias.reshape(3, H, hd).clone()
        w[:2], b[:2] = w[:2, :, perm], b[:2, :, perm]  # queries and keys only
        out |= {
            p + "input_layernorm.weight": block.ln1.weight, p + "input_layernorm.bias": block.ln1.bias,
            p + "post_attention_layernorm.weight": block.ln2.weight, p + "post_attention_layernorm.bias": block.ln2.bias,
            p + "attention.query_key_value.weight": w.transpose(0, 1).reshape(3 * D, D),
            p + "attention.query_key_value.bias": b.transpose(0, 1).reshape(3 * D),
            p + "attention.dense.weight": block.attn.proj.weight, p + "attention.dense.bias": block.attn.proj.bias,
            p + "mlp.dense_h_to_4h.weight": block.mlp[0].weight, p + "mlp.dense_h_to_4h.bias": block.mlp[0].bias,
            p + "mlp.dense_4h_to_h.weight": block.mlp[2].weight, p + "mlp.dense_4h_to_h.bias": block.mlp[2].bias,
        }
    out |= {"gpt_neox.final_layer_norm.weight": model.ln_f.weight, "gpt_neox.final_layer_norm.bias": model.ln_f.bias,
            "lm_head.weight": model.head.weight}
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def to_hf_model(model: nn.Module, text_only: bool = False, pad_id: int | None = None, bos_id: int | None = None):
    """A ``GPTNeoXForCausalLM`` (float32, eval mode) computing what ``model`` computes."""
    from transformers import GPTNeoXForCausalLM

    backbone = exportable_backbone(model, text_only)
    hf = GPTNeoXForCausalLM(neox_config(backbone, pad_id, bos_id))
    hf.load_state_dict(neox_state_dict(backbone), strict=True)
    return hf.float().eval()


def hf_inputs(batch) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for the HF model from a lab batch:
    the mask is the batch's ``attend`` (padding and noise are never attended to) and positions
    count every token, noise included (the lab's positions are 0..T-1)."""
    tokens = batch["tokens"]
    B, T = tokens.shape
    return {"input_ids": tokens, "attention_mask": batch["attend"].long(),
            "position_ids": torch.arange(T, device=tokens.device).expand(B, T)}

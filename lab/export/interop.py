"""A lab model in TransformerLens and nnsight (the ``interop`` extra: ``pip install -e '.[interop]'``).

- :func:`to_hooked_transformer`: a TransformerLens ``HookedTransformer`` with the exported GPT-NeoX
  weights (``convert_neox_weights``; no LayerNorm folding or centring, so logits are the lab's).
- :func:`lab_attention_hooks`: ``fwd_hooks`` giving every layer the lab's attention mask (causal,
  attendable keys only, each query its own position), for prompts with padding or noise tokens.
  TransformerLens's own ``attention_mask`` argument also renumbers rotary positions past masked
  tokens (it suits left padding), which the lab does not do; with right padding and no noise it
  gives the same logits at real tokens.
- :func:`resid_hook_name`: the hook holding the lab's h_l.
- :func:`to_nnsight`: the lab model (or the exported HF model) wrapped by ``nnsight.NNsight``.

``source`` is a run directory, a folder written by export.py, a lab model or a
``GPTNeoXForCausalLM``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lab.errors import LabError


def hf_model(source, checkpoint: str = "last", text_only: bool = False):
    """``(GPTNeoXForCausalLM, tokenizer or None)`` for any ``source`` (see module docstring)."""
    import transformers

    from lab.build import load_trained
    from lab.export.gpt_neox import to_hf_model
    from lab.export.tokenizer import build_tokenizer
    from tasks.vocab import BOS

    if isinstance(source, transformers.PreTrainedModel):
        return source.eval(), None
    if isinstance(source, nn.Module):
        return to_hf_model(source, text_only), None
    folder = Path(source)
    if (folder / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return model.eval(), tokenizer
    _, task, model, _ = load_trained(folder, checkpoint)
    vocab = task.vocab
    hf = to_hf_model(model, text_only, pad_id=vocab.pad_id, bos_id=vocab.index.get(BOS))
    return hf, build_tokenizer(list(vocab.tokens), hf.config.max_position_embeddings)


def hooked_config(config):
    """The ``HookedTransformerConfig`` of a sequential GPT-NeoX config, nothing folded."""
    from transformer_lens import HookedTransformerConfig

    if config.model_type != "gpt_neox" or config.use_parallel_residual:
        raise LabError("to_hooked_transformer takes the lab's export: a GPT-NeoX model with use_parallel_residual=false")
    d_head = config.hidden_size // config.num_attention_heads
    rotary_dim = round(config.rope_parameters.get("partial_rotary_factor", 1.0) * d_head)
    return HookedTransformerConfig(
        d_model=config.hidden_size, d_head=d_head, n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size, n_layers=config.num_hidden_layers, n_ctx=config.max_position_embeddings,
        d_vocab=config.vocab_size, eps=config.layer_norm_eps, act_fn=config.hidden_act, normalization_type="LN",
        # no rotary dimension (pos_encoding=none): standard positions with a zero table add nothing
        positional_embedding_type="rotary" if rotary_dim else "standard",
        rotary_dim=rotary_dim or None, rotary_base=config.rope_parameters["rope_theta"], rotary_adjacent_pairs=False,
        parallel_attn_mlp=False, original_architecture="GPTNeoXForCausalLM", default_prepend_bos=False,
        dtype=torch.float32, device="cpu",
    )


def to_hooked_transformer(source, checkpoint: str = "last", text_only: bool = False):
    """A TransformerLens ``HookedTransformer`` computing the lab model's logits (eval mode, CPU).
    Feed it token ids (the lab's batches, or the exported tokenizer's ``input_ids``)."""
    import warnings

    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    hf, tokenizer = hf_model(source, checkpoint, text_only)
    cfg = hooked_config(hf.config)
    state = convert_neox_weights(hf, cfg)
    if cfg.positional_embedding_type == "standard":
        state["pos_embed.W_pos"] = torch.zeros(cfg.n_ctx, cfg.d_model)
    with warnings.catch_warnings():  # HookedTransformer's own deprecation note (TransformerLens 3.x)
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.tokenizer = tokenizer  # no BOS is added: lab prompts start with their own [BOS]
    return model.eval()


def lab_attention_mask(attend: Tensor) -> Tensor:
    """[B, 1, T, T] bool, True = may attend: the lab's mask (``lab.models.interface.attention_mask``)."""
    T = attend.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attend.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attend.device)
    return ((causal[None] & attend[:, None, :]) | eye[None])[:, None]


def lab_attention_hooks(attend: Tensor) -> list:
    """TransformerLens ``fwd_hooks`` that put the lab's attention mask on every layer's scores,
    for ``model.run_with_hooks(tokens, fwd_hooks=...)`` or ``with model.hooks(fwd_hooks=...)``."""
    allowed = lab_attention_mask(attend)

    def mask_scores(scores: Tensor, hook) -> Tensor:
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    return [(lambda name: name.endswith("attn.hook_attn_scores"), mask_scores)]


def resid_hook_name(layer: int, n_layers: int) -> str:
    """The TransformerLens hook whose value is the lab's h_layer (layer 0..L; h_0 = embeddings)."""
    if not 0 <= layer <= n_layers:
        raise LabError(f"layer {layer} is outside 0..{n_layers}")
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def to_nnsight(source, checkpoint: str = "last", hf: bool = False):
    """``nnsight.NNsight`` around the lab model of ``source`` (its blocks are ``.blocks[l]``, whose
    output is h_{l+1}; call it with a lab batch), or with ``hf=True`` around the exported
    ``GPTNeoXForCausalLM`` (``.gpt_neox.layers[l]``; call it with :func:`~lab.export.gpt_neox.hf_inputs`)."""
    from nnsight import NNsight

    from lab.build import load_trained

    if hf or (not isinstance(source, nn.Module) and (Path(source) / "config.json").is_file()):
        return NNsight(hf_model(source, checkpoint)[0])
    model = source if isinstance(source, nn.Module) else load_trained(source, checkpoint)[2]
    return NNsight(model.eval())

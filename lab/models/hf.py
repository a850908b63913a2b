"""A Hugging Face causal LM exposed through the residual-stream interface (docs/architecture.md).

``HFModel`` wraps a ``transformers`` ``*ForCausalLM`` and splits it into

- ``embed(batch)``: token embeddings (+ learned positions for GPT-2), the 4D additive attention
  mask and the rotary tables (``position_embeddings``) the decoder layers expect;
- ``block(l, stream)``: decoder layer ``l`` called directly, with the mask rebuilt when the
  stream carries an attention knockout;
- ``readout(h)``: final norm + ``lm_head``.

Per-head and MLP writes, attention patterns and attention scaling (:mod:`lab.models.probe`) are
recorded by hooks and a registered attention function (:mod:`lab.models.hf_probe`); the plain
path is untouched when nothing is asked. OLMo-2 normalises the attention output after summing
the heads, so it has no per-head writes (a LabError says so); its block writes are recorded.

Supported families (``config.model_type``): gpt2, gpt_neox (Pythia), llama, mistral, qwen2,
olmo, olmo2. The adapter builds the attention mask itself (causal & attendable keys & not
knocked out, plus the sliding window of layers that use one), as a float additive mask, which
both the ``eager`` and ``sdpa`` attention implementations of transformers 5.x accept.

Building: ``HFModel.from_path(path)`` takes a local folder written by ``save_pretrained``
(loaded with ``local_files_only=True``: nothing is downloaded), a JSON/YAML config file (random
initialisation, seeded), or the name of a tiny preset (``tiny-gpt2``, ``tiny-gpt_neox``,
``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-olmo``, ``tiny-olmo2``) used in tests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from lab.errors import LabError
from lab.models.interface import ResidualModel, Stream, attention_mask


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts (attribute names on the base model)."""

    embed: str
    layers: str
    norm: str
    learned_positions: str | None = None   # GPT-2's wpe
    rotary: str | None = None              # module producing (cos, sin) position_embeddings
    embed_dropout: str | None = None
    # inside a decoder layer (lab.models.hf_probe): the attention module, the module whose output is
    # the attention write (its input holds the head outputs unless post_norm), the MLP write
    attn: str = "self_attn"
    attn_write: str = "self_attn.o_proj"
    mlp_write: str = "mlp"
    conv1d: bool = False                   # GPT-2's Conv1D output projection (weight [in, out])
    post_norm: bool = False                # a norm after attention: the heads' writes do not add up


FAMILIES: dict[str, Family] = {
    "gpt2": Family(embed="wte", layers="h", norm="ln_f", learned_positions="wpe", embed_dropout="drop",
                   attn="attn", attn_write="attn.c_proj", conv1d=True),
    "gpt_neox": Family(embed="embed_in", layers="layers", norm="final_layer_norm", rotary="rotary_emb",
                       embed_dropout="emb_dropout", attn="attention", attn_write="attention.dense"),
    "llama": Family(embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb"),
    "mistral": Family(embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb"),
    "qwen2": Family(embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb"),
    "olmo": Family(embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb"),
    "olmo2": Family(embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb",
                    attn_write="post_attention_layernorm", mlp_write="post_feedforward_layernorm", post_norm=True),
}

_TINY = dict(vocab_size=128, hidden=32, layers=3, heads=4, inter=64, max_pos=256)

PRESETS: dict[str, dict] = {
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=_TINY["vocab_size"], n_embd=_TINY["hidden"],
                      n_layer=_TINY["layers"], n_head=_TINY["heads"], n_positions=_TINY["max_pos"],
                      bos_token_id=0, eos_token_id=0),
    "tiny-gpt_neox": dict(model_type="gpt_neox", vocab_size=_TINY["vocab_size"], hidden_size=_TINY["hidden"],
                          num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"],
                          intermediate_size=_TINY["inter"], max_position_embeddings=_TINY["max_pos"],
                          rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
}
for _name in ("llama", "mistral", "qwen2", "olmo", "olmo2"):
    PRESETS[f"tiny-{_name}"] = dict(
        model_type=_name, vocab_size=_TINY["vocab_size"], hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"], num_key_value_heads=2,
        intermediate_size=_TINY["inter"], max_position_embeddings=_TINY["max_pos"],
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
PRESETS["tiny-mistral"]["sliding_window"] = 8  # exercise the sliding-window mask in tests


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _getattr_path(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class HFModel(ResidualModel):
    """A transformers causal LM as a stack of residual blocks."""

    supports_probe = True

    def __init__(self, hf_model, tokenizer=None, source: str = "") -> None:
        super().__init__()
        config = hf_model.config
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise LabError(
                f"Hugging Face model type {config.model_type!r} is not supported by the residual-stream "
                f"adapter; supported families: {sorted(FAMILIES)}"
            )
        self.hf, self.family, self.tokenizer, self.source = hf_model, family, tokenizer, source
        self.base = hf_model.base_model
        self.layers = _getattr_path(self.base, family.layers)
        self.n_layers = len(self.layers)
        self.vocab_size = int(config.vocab_size)
        self.max_len = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 10**9))
        self.model_type = config.model_type
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        self.windows: list[int | None] = [
            (window if (window and (layer_types is None or layer_types[i] == "sliding_attention")) else None)
            for i in range(self.n_layers)
        ]
        self.hf.eval()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_path(cls, path: str | Path, dtype: str = "float32", seed: int = 0,
                  attn_implementation: str | None = None, **overrides) -> "HFModel":
        """Local ``save_pretrained`` folder, a JSON/YAML config file, or a preset name."""
        import transformers

        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise LabError(f"model.dtype={dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        text = str(path)
        if text in PRESETS or Path(text).is_file():
            config_dict = dict(PRESETS[text]) if text in PRESETS else _read_config(Path(text))
            config_dict.update(overrides)
            config = _make_config(config_dict, text)
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
            return cls(model, None, source=text)
        folder = Path(text)
        if not folder.is_dir():
            raise LabError(
                f"model.path={text!r} is neither a local model folder, a config file, nor a preset "
                f"({sorted(PRESETS)}); nothing is downloaded, so pass a folder written by save_pretrained"
            )
        if not (folder / "config.json").is_file():
            raise LabError(f"{folder} has no config.json; pass a folder written by save_pretrained")
        config_dict = json.loads((folder / "config.json").read_text())
        if config_dict.get("model_type") not in FAMILIES:
            raise LabError(
                f"{folder}: Hugging Face model type {config_dict.get('model_type')!r} is not supported; "
                f"supported families: {sorted(FAMILIES)}"
            )
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=torch_dtype, **kwargs
            )
        except (OSError, ValueError) as error:
            raise LabError(f"cannot load the model in {folder}: {str(error)[:300]}") from None
        tokenizer = None
        if any((folder / f).is_file() for f in TOKENIZER_FILES):  # else transformers invents an empty one
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception:  # noqa: BLE001 - unreadable tokenizer: the byte/char fallback is used
                tokenizer = None
        return cls(model, tokenizer, source=str(folder))

    # ------------------------------------------------------------------ interface
    def _mask(self, stream: Stream, window: int | None) -> Tensor:
        allowed = attention_mask(stream)  # [B, 1, T, T] bool
        if window:
            T = allowed.shape[-1]
            idx = torch.arange(T, device=allowed.device)
            allowed = allowed & ((idx[:, None] - idx[None, :]) < window)[None, None]
        dtype = stream.h.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def embed(self, batch: Mapping[str, Tensor]) -> Stream:
        tokens = batch["tokens"]
        B, T = tokens.shape
        if T > self.max_len:
            raise LabError(f"sequence of length {T} exceeds the HF model's {self.max_len} positions")
        if int(tokens.max()) >= self.vocab_size:
            raise LabError(
                f"token id {int(tokens.max())} is outside the HF model's vocabulary ({self.vocab_size}); "
                "the data's tokenization does not fit this model"
            )
        attend = batch.get("attend")
        if attend is None:
            attend = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        h = _getattr_path(self.base, self.family.embed)(tokens)
        if self.family.learned_positions:
            h = h + _getattr_path(self.base, self.family.learned_positions)(positions)
        if self.family.embed_dropout:
            h = _getattr_path(self.base, self.family.embed_dropout)(h)
        stream = Stream(h=h, attend=attend, positions=positions)
        stream.extra["masks"] = {w: self._mask(stream, w) for w in set(self.windows)}
        if self.family.rotary:
            stream.extra["position_embeddings"] = _getattr_path(self.base, self.family.rotary)(h, positions)
        return stream

    def block(self, layer: int, stream: Stream) -> Tensor:
        window = self.windows[layer]
        if stream.knockout is not None or "masks" not in stream.extra:
            mask = self._mask(stream, window)
        else:
            mask = stream.extra["masks"][window]
        kwargs = {"attention_mask": mask, "position_ids": stream.positions}
        if "position_embeddings" in stream.extra:
            kwargs["position_embeddings"] = stream.extra["position_embeddings"]
        probe = stream.extra.get("probe")
        if probe is not None:
            from lab.models.hf_probe import probing

            with probing(self, layer, probe):
                out = self.layers[layer](stream.h, **kwargs)
        else:
            out = self.layers[layer](stream.h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def readout(self, h: Tensor) -> Tensor:
        return self.hf.get_output_embeddings()(_getattr_path(self.base, self.family.norm)(h))

    def readout_parts(self):
        head = self.hf.get_output_embeddings()
        return _getattr_path(self.base, self.family.norm), head.weight, getattr(head, "bias", None)


def _read_config(path: Path) -> dict:
    try:
        if path.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        else:
            data = json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001
        raise LabError(f"cannot read the model config {path}: {str(error)[:200]}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise LabError(f"{path} is not a Hugging Face model config (it needs a model_type key)")
    return data


def _make_config(config_dict: dict, source: str):
    import transformers

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type not in FAMILIES:
        raise LabError(
            f"{source}: Hugging Face model type {model_type!r} is not supported; supported families: {sorted(FAMILIES)}"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **config_dict)
    except (TypeError, ValueError) as error:
        raise LabError(f"{source}: invalid {model_type} config: {str(error)[:300]}") from None


def build_hf_model(path: str, dtype: str = "float32", seed: int = 0, attn_implementation: str | None = None,
                   config_overrides: Mapping | None = None, **_ignored) -> HFModel:
    """Hydra target of ``conf/model/hf.yaml``."""
    if not path:
        raise LabError("pass the Hugging Face model: model=hf model.path=<local folder | config file | preset>")
    return HFModel.from_path(path, dtype=dtype, seed=seed, attn_implementation=attn_implementation,
                             **dict(config_overrides or {}))

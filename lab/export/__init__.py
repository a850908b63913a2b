"""Lab checkpoints out of the lab: an exact Hugging Face GPT-NeoX export (:mod:`.gpt_neox`,
:mod:`.tokenizer`, :mod:`.folder`) and, with the ``interop`` extra, TransformerLens and nnsight
(:mod:`.interop`). docs/interop.md shows the whole path."""

"""Data: the embedded corpus, tokenizers and LightningDataModules for causal-LM training and LAMBADA.

Names are imported lazily on first access, so ``import lightning_llm.data.corpus`` (or ``.tokenizer``) does not pull
in Lightning.
"""

from __future__ import annotations

from lightning_llm._lazy import lazy_exports

_EXPORTS = {
    "embedded_corpus": "lightning_llm.data.corpus",
    "embedded_documents": "lightning_llm.data.corpus",
    "embedded_split_documents": "lightning_llm.data.corpus",
    "embedded_splits": "lightning_llm.data.corpus",
    "split_documents": "lightning_llm.data.corpus",
    "EOS_TOKEN": "lightning_llm.data.tokenizer",
    "Tokenizer": "lightning_llm.data.tokenizer",
    "load_tokenizer": "lightning_llm.data.tokenizer",
    "IGNORE_INDEX": "lightning_llm.data.text",
    "PackedBlockDataset": "lightning_llm.data.text",
    "TextDataModule": "lightning_llm.data.text",
    "load_documents": "lightning_llm.data.text",
    "pack_documents": "lightning_llm.data.text",
    "LambadaDataModule": "lightning_llm.data.lambada",
    "PreferenceDataModule": "lightning_llm.data.preference",
    "ChatTemplate": "lightning_llm.data.preference",
    "collate_preference": "lightning_llm.data.preference",
    "PromptDataModule": "lightning_llm.data.prompts",
    "SFTDataModule": "lightning_llm.data.sft",
    "collate_prompts": "lightning_llm.data.prompts",
    "TargetCharReward": "lightning_llm.data.synthetic",
    "char_tokenizer": "lightning_llm.data.synthetic",
    "synthetic_preference_examples": "lightning_llm.data.synthetic",
    "synthetic_prompts": "lightning_llm.data.synthetic",
    "collate_lambada": "lightning_llm.data.lambada",
    "encode_lambada": "lightning_llm.data.lambada",
    "harness_order": "lightning_llm.data.lambada",
    "lambada_split": "lightning_llm.data.lambada",
    "read_lambada_jsonl": "lightning_llm.data.lambada",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

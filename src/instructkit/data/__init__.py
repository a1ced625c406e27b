"""The data layer: read records, convert them to conversations, render and tokenize them
with a loss mask, plan (packed) micro-batches and collate them into tensors.

See docs/DESIGN.md, section "data", for the contracts.
"""

from instructkit.data.collate import IGNORE_INDEX, block_causal_mask, collate
from instructkit.data.formats import FORMATS, Conversation, detect_format, to_conversations
from instructkit.data.packing import pack_rows, plan_micro_batches
from instructkit.data.readers import load_records
from instructkit.data.sft import SFTData, build_sft_data, split_indices
from instructkit.data.templates import (
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_INPUT,
    TokenizerInfo,
    build_prompt_ids,
    has_target,
    resolve_template,
    tokenize_conversation,
    tokenize_conversations,
    tokenizer_info,
)

__all__ = [
    "ALPACA_PREAMBLE",
    "ALPACA_PREAMBLE_INPUT",
    "Conversation",
    "FORMATS",
    "IGNORE_INDEX",
    "SFTData",
    "TokenizerInfo",
    "block_causal_mask",
    "build_prompt_ids",
    "build_sft_data",
    "collate",
    "detect_format",
    "has_target",
    "load_records",
    "pack_rows",
    "plan_micro_batches",
    "resolve_template",
    "split_indices",
    "to_conversations",
    "tokenize_conversation",
    "tokenize_conversations",
    "tokenizer_info",
]

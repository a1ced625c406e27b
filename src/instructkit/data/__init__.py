"""The data layer: read records, convert them to conversations, render and tokenize them
with a loss mask, plan (packed) micro-batches and collate them into tensors.

See docs/DESIGN.md, section "data", for the contracts.
"""

from instructkit.data.collate import IGNORE_INDEX, block_causal_mask, collate
from instructkit.data.formats import FORMATS, Conversation, detect_format, to_conversations
from instructkit.data.packing import pack_rows, plan_micro_batches
from instructkit.data.preference import (
    PREFERENCE_FORMATS,
    PreferenceData,
    PreferenceExample,
    PreferenceGroup,
    build_preference_data,
    collate_preference,
    detect_preference_format,
    pairs_of,
    parse_hh_transcript,
    plan_preference_batches,
    split_shared_prefix,
    to_preference_groups,
    tokenize_preference,
)
from instructkit.data.readers import load_records
from instructkit.data.sft import SFTData, build_sft_data, split_indices
from instructkit.data.templates import (
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_INPUT,
    TokenizerInfo,
    build_prompt_ids,
    cut_after_answer,
    end_of_turn_id,
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
    "PREFERENCE_FORMATS",
    "PreferenceData",
    "PreferenceExample",
    "PreferenceGroup",
    "SFTData",
    "TokenizerInfo",
    "block_causal_mask",
    "build_preference_data",
    "build_prompt_ids",
    "build_sft_data",
    "collate",
    "collate_preference",
    "cut_after_answer",
    "detect_format",
    "detect_preference_format",
    "end_of_turn_id",
    "has_target",
    "load_records",
    "pack_rows",
    "pairs_of",
    "parse_hh_transcript",
    "plan_micro_batches",
    "plan_preference_batches",
    "resolve_template",
    "split_indices",
    "split_shared_prefix",
    "to_conversations",
    "to_preference_groups",
    "tokenize_conversation",
    "tokenize_conversations",
    "tokenize_preference",
    "tokenizer_info",
]

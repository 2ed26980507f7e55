"""The decode wing: decision rules (`rules`), the engine (`engine`: static caches, segments
between exits, CUDA graphs on a GPU), the draft policy and cost measurement (`policy`), and the
generate API (`api`: options, thresholds, text, streaming, HF `custom_generate`)."""

from eetune.decode.api import (DEFAULT_THRESHOLD, MODES, DecodeOptions, Generation, RowResult, TextStream, TokenStat,
                               chat_prompt_ids, custom_generate, end_token_ids, generate, generate_ids, generate_text,
                               resolve_thresholds)
from eetune.decode.rules import CONFIDENCES, choose, confidence, sampling_probs, speculative_accept

__all__ = ["CONFIDENCES", "DEFAULT_THRESHOLD", "MODES", "DecodeOptions", "Generation", "RowResult", "TextStream",
           "TokenStat", "chat_prompt_ids",
           "choose", "confidence", "custom_generate", "end_token_ids", "generate", "generate_ids", "generate_text",
           "resolve_thresholds", "sampling_probs", "speculative_accept"]

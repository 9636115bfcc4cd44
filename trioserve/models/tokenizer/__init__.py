"""Rebuild a Hugging Face tokenizer from the tokenizer stored in GGUF metadata.

Why: a GGUF file carries its vocabulary, merges, special tokens and chat template as
metadata, but mlx-lm loads tokenizers through `transformers` from `tokenizer.json` and
`tokenizer_config.json`. With no model hub reachable, we write those files ourselves.

Supported: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, Llama 3, Qwen 2/3,
with the split each `tokenizer.ggml.pre` names, see `bpe.PRE_TOKENIZERS`) and SentencePiece
BPE (`"llama"`: Llama 2, Mistral, Phi-3, Gemma). Unigram (`t5`), WordPiece (`bert`), RWKV
and unknown pre-tokenizer names raise `TokenizerMetadataError`.
"""

from trioserve.models.tokenizer.common import TokenizerMetadataError
from trioserve.models.tokenizer.files import (
    build_tokenizer,
    special_token_ids,
    stop_token_ids,
    write_tokenizer_files,
)

__all__ = [
    "TokenizerMetadataError",
    "build_tokenizer",
    "special_token_ids",
    "stop_token_ids",
    "write_tokenizer_files",
]

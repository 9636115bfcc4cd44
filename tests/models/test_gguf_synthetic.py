"""A tiny synthetic llama GGUF with unquantized F16/F32 tensors and an untied output head."""

from __future__ import annotations

import json
from pathlib import Path

from trioserve.models import convert_gguf, load_model


def _u32(value: int):
    import mlx.core as mx

    return mx.array(value, dtype=mx.uint32)


def write_tiny_llama(path: Path) -> None:
    import mlx.core as mx

    hidden, heads, kv_heads, ffn, layers = 16, 2, 1, 32, 2
    head_dim = hidden // heads
    byte_tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_tokens + ["ab", "Ġa"]
    merges = ["a b", "Ġ a"]
    vocab = len(tokens)
    rand = lambda *shape: (mx.random.normal(shape) * 0.1).astype(mx.float16)  # noqa: E731
    weights = {
        "token_embd.weight": rand(vocab, hidden),
        "output.weight": rand(vocab, hidden),
        "output_norm.weight": mx.ones((hidden,)),
    }
    for i in range(layers):
        weights |= {
            f"blk.{i}.attn_q.weight": rand(heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": rand(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": rand(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": rand(hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": rand(ffn, hidden),
            f"blk.{i}.ffn_up.weight": rand(ffn, hidden),
            f"blk.{i}.ffn_down.weight": rand(hidden, ffn),
            f"blk.{i}.attn_norm.weight": mx.ones((hidden,)),
            f"blk.{i}.ffn_norm.weight": mx.ones((hidden,)),
        }
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": _u32(hidden),
        "llama.block_count": _u32(layers),
        "llama.feed_forward_length": _u32(ffn),
        "llama.attention.head_count": _u32(heads),
        "llama.attention.head_count_kv": _u32(kv_heads),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5),
        "llama.context_length": _u32(256),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (vocab - 3), dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": _u32(2),
        "tokenizer.ggml.bos_token_id": _u32(1),
    }
    mx.save_gguf(str(path), weights, metadata)


def test_tiny_unquantized_llama_converts_and_runs(tmp_path):
    import mlx.core as mx

    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama(gguf)
    out = convert_gguf(gguf, tmp_path / "tiny", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == 1 and config["max_position_embeddings"] == 256
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())

    model, tokenizer = load_model(out)
    assert tokenizer.eos_token_ids == {2}
    ids = tokenizer.encode("ab a<|im_end|>", add_special_tokens=False)
    assert ids == [tokenizer.convert_tokens_to_ids("ab"), tokenizer.convert_tokens_to_ids("Ġa"), 2]
    logits = model(mx.array([ids]))
    assert logits.shape == (1, 3, config["vocab_size"])
    assert logits.dtype == mx.bfloat16

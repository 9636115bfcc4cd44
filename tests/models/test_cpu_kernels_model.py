"""The CPU kernels installed in the real model: same predictions as mlx-lm's own layers."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from trioserve.engine.cpu_kernels import install_cpu_kernels
from trioserve.models import load_model


def _prefill_logits(model, tokens: list[int], step: int) -> mx.array:
    cache = make_prompt_cache(model)
    prompt = mx.array([tokens])
    for start in range(0, len(tokens) - 1, step):
        model(prompt[:, start : min(start + step, len(tokens) - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(prompt[:, -1:], cache=cache)[0, -1]  # a decode step (one token)
    return logits, cache


def test_installed_kernels_give_mlx_lm_s_predictions(model_dir: Path, ask):
    model, tokenizer = load_model(model_dir)  # a model of its own: installing changes it
    tokens = tokenizer.encode("The history of the river valley, told slowly. " * 60)
    reference, _ = _prefill_logits(model, tokens, step=128)
    # Prefill with mlx-lm's layers, then one decode step with ours: the decode path alone.
    _, reference_cache = _prefill_logits(model, tokens[:-1], step=128)

    assert install_cpu_kernels(model) is True
    assert all(isinstance(layer.self_attn, llama.Attention) for layer in model.layers)
    assert type(model.layers[0].self_attn) is not llama.Attention
    fast, _ = _prefill_logits(model, tokens, step=128)
    decoded = model(mx.array([tokens[-1:]]), cache=reference_cache)[0, -1]
    assert mx.allclose(decoded, reference, atol=2e-3, rtol=1e-3).item()

    assert mx.argmax(fast).item() == mx.argmax(reference).item()
    assert mx.allclose(fast, reference, atol=2e-3, rtol=1e-3).item(), mx.abs(fast - reference).max()
    assert "Paris" in ask(model, tokenizer, "What is the capital of France?")


def test_not_installed_when_mlx_is_not_on_the_cpu(model_dir: Path, monkeypatch):
    model, _ = load_model(model_dir)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert install_cpu_kernels(model) is False
    assert type(model.layers[0].self_attn) is llama.Attention


def test_the_off_switch_keeps_mlx_lm_s_layers(model_dir: Path, monkeypatch):
    model, _ = load_model(model_dir)
    monkeypatch.setenv("TRIOSERVE_NO_CPU_KERNELS", "1")
    assert install_cpu_kernels(model) is False
    assert type(model.layers[0].self_attn) is llama.Attention


def test_one_decoding_sequence_takes_mlx_s_ops_and_a_prefill_chunk_ours(
    model_dir: Path, monkeypatch
):
    from trioserve.engine import cpu_kernels

    model, tokenizer = load_model(model_dir)
    assert install_cpu_kernels(model) is True
    calls = {"attention": 0, "swiglu": 0}

    def counted(name):
        kernel = getattr(cpu_kernels, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(cpu_kernels, name, counted(name))
    tokens = tokenizer.encode("The history of the river valley, told slowly. " * 10)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))  # a prefill chunk: ours, every layer
    assert calls == {"attention": len(model.layers), "swiglu": len(model.layers)}
    mx.eval(model(mx.array([tokens[-1:]]), cache=cache))  # one decode step: MLX's
    assert calls == {"attention": len(model.layers), "swiglu": len(model.layers)}

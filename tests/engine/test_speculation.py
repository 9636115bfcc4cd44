"""Speculative decoding on the real embedded model: the same answers, fewer steps.

The workload is a code edit: a 100-line source file in the prompt, asked back with a rename,
with the assistant's code block already opened. This 135M model rewrites the file more than
it copies it (repetitive code, so prompt lookup still finds much to draft). Runs share one
engine with the prefix cache on, so the ~1200-token prompt is read once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio
import trio.lowlevel

from tests.engine.conftest import chat_request, collect, finish_of, text_of, tokens_of, wait_for
from trioserve.engine.events import Failed, Finished, TokenDelta
from trioserve.engine.params import GenerationRequest, SamplingParams
from trioserve.engine.speculation import SpeculationConfig
from trioserve.models.chat_template import chat_prompt_tokens

SOURCE = (Path(__file__).parent.parent / "fixtures" / "speculation" / "inventory.py").read_text()
EDITED = SOURCE.replace("Inventory", "Stock")
MAX_TOKENS = 96


def edit_request(engine, max_tokens: int = MAX_TOKENS, **kwargs) -> GenerationRequest:
    tokenizer = engine.tokenizer
    ask = "Rename the class `Inventory` to `Stock` in this file and return the whole file."
    messages = [{"role": "user", "content": f"{ask}\n\n```python\n{SOURCE}```"}]
    tokens = chat_prompt_tokens(tokenizer, messages)
    tokens += tokenizer.encode("```python\n", add_special_tokens=False)
    return GenerationRequest(
        prompt_tokens=tuple(tokens), max_tokens=max_tokens, request_id="edit", **kwargs
    )


def predicted(engine) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(EDITED, add_special_tokens=False))


def drafts(engine) -> dict[str, tuple[int, int]]:
    return {m: (p, a) for m, p, a in engine.stats().worker.speculation}


async def test_greedy_edit_is_the_same_with_and_without_speculation(open_engine):
    async with open_engine(parallel=1, prefix_cache_bytes=256 << 20) as engine:
        base = edit_request(engine)
        off = await collect(engine, base)
        assert drafts(engine) == {}  # speculation is off by default
        lookup = await collect(engine, replace(base, speculation="prompt-lookup"))
        after_lookup = drafts(engine)
        prediction = await collect(engine, replace(base, prediction_tokens=predicted(engine)))
        counts = drafts(engine)
    assert len(tokens_of(off)) == MAX_TOKENS
    assert "class" in text_of(off)
    assert tokens_of(lookup) == tokens_of(off)
    assert tokens_of(prediction) == tokens_of(off)
    # Drafts were proposed and mostly taken (not a run that never speculated).
    proposed, accepted = after_lookup["prompt-lookup"]
    assert accepted > MAX_TOKENS // 3 and accepted <= proposed
    # This small model rewrites more than it copies: fewer of the prediction's tokens fit.
    proposed, accepted = counts["prediction"]
    assert accepted >= 8
    usage = finish_of(prediction).usage
    assert usage.accepted_prediction_tokens == accepted
    assert usage.rejected_prediction_tokens == proposed - accepted
    assert usage.completion_tokens == MAX_TOKENS
    assert finish_of(off).usage.accepted_prediction_tokens is None


async def test_speculating_and_plain_sequences_share_the_batch(open_engine):
    """A drafting sequence, a seeded one drafting by prompt lookup, and a plain chat, in one
    batch: each gives the tokens it gives with speculation off in the same company."""
    # Prompt lookup drafts beside two others here (by default only up to 2 rows decode).
    speculation = SpeculationConfig(lookup_max_batch=3)
    async with open_engine(
        parallel=3, prefix_cache_bytes=256 << 20, speculation=speculation
    ) as engine:
        edit = edit_request(engine, max_tokens=64)
        seeded = replace(edit, sampling=SamplingParams(temperature=0.8, seed=3), max_tokens=48)
        chat_tokens = chat_prompt_tokens(
            engine.tokenizer, [{"role": "user", "content": "Name a fruit."}]
        )
        chat = GenerationRequest(prompt_tokens=tuple(chat_tokens), max_tokens=24)
        await collect(engine, replace(edit, max_tokens=1))  # the prompt into the prefix cache

        async def together(requests) -> list[list[int]]:
            out: list[list[int]] = [[] for _ in requests]

            async def run(i: int) -> None:
                out[i] = tokens_of(await collect(engine, requests[i]))

            async with trio.open_nursery() as nursery:
                for i in range(len(requests)):
                    nursery.start_soon(run, i)
            return out

        plain = await together([edit, seeded, chat])
        spec = await together(
            [
                replace(edit, prediction_tokens=predicted(engine)),
                replace(seeded, speculation="prompt-lookup"),
                chat,
            ]
        )
        counts = drafts(engine)
    assert counts["prediction"][1] > 0 and counts["prompt-lookup"][0] > 0
    # Batches of different widths may round differently in the last bits (see
    # test_engine.py), so a near-tie deep in an answer could flip: the answers must agree
    # where the margins are clear, well past the first drafts.
    assert spec[0][:40] == plain[0][:40]
    assert spec[1][:16] == plain[1][:16]
    assert spec[2][:8] == plain[2][:8]
    assert [len(t) for t in spec] == [len(t) for t in plain]  # never past max_tokens


async def test_speculation_keeps_stop_strings_max_tokens_and_logprobs(open_engine):
    async with open_engine(parallel=1, prefix_cache_bytes=256 << 20) as engine:
        base = edit_request(engine, max_tokens=48)
        full = text_of(await collect(engine, base))
        stop = "represents"
        assert stop in full, full
        stopped = await collect(engine, replace(base, stop=(stop,), speculation="prompt-lookup"))
        assert text_of(stopped) == full[: full.index(stop)]
        assert finish_of(stopped).reason == "stop"

        short = await collect(
            engine, replace(base, max_tokens=7, prediction_tokens=predicted(engine))
        )
        assert len(tokens_of(short)) == 7 and finish_of(short).usage.completion_tokens == 7

        with_lp = replace(
            base, max_tokens=24, sampling=SamplingParams(logprobs=True, top_logprobs=2)
        )
        plain_lp = await collect(engine, with_lp)
        spec_lp = await collect(engine, replace(with_lp, prediction_tokens=predicted(engine)))
        assert drafts(engine)["prediction"][1] > 0
    plain_deltas = [e for e in plain_lp if isinstance(e, TokenDelta)]
    spec_deltas = [e for e in spec_lp if isinstance(e, TokenDelta)]
    assert [e.token for e in spec_deltas] == [e.token for e in plain_deltas]
    for a, b in zip(spec_deltas, plain_deltas, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-3
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]


async def test_cancel_mid_verification_frees_the_slot(open_engine):
    async with open_engine(parallel=1, prefix_cache_bytes=256 << 20) as engine:
        request = edit_request(engine, max_tokens=400, prediction_tokens=predicted(engine))
        with trio.CancelScope() as scope:
            with engine.admit(request) as handle:
                await handle.start()
                seen = 0
                async for event in handle.events():
                    assert not isinstance(event, Finished | Failed), "finished before the cancel"
                    if isinstance(event, TokenDelta):
                        seen += 1
                    # Cancel once drafts are being verified: several tokens per step.
                    if seen >= 8 and drafts(engine).get("prediction", (0, 0))[1] > 0:
                        steps = engine.stats().worker.steps
                        scope.cancel()
                        await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        stats = await wait_for(engine, lambda s: s.worker.in_batch == 0)
        assert stats.slots_busy == 0 and stats.worker.tracked == 0
        assert stats.worker.steps <= steps + 2
        # The engine still answers, and the same way.
        again = await collect(engine, replace(request, max_tokens=16))
        plain = await collect(engine, replace(request, max_tokens=16, prediction_tokens=None))
        assert tokens_of(again) == tokens_of(plain)


async def test_a_draft_model_drafts_and_the_answer_is_the_same(open_engine, model_dir):
    """``--draft-model`` with the model itself as the draft: every draft should be taken
    (the same greedy choices), and the answer is the one plain decoding gives. A prompt
    longer than the draft's catch-up chunk checks that it reads the prompt over several
    steps before it drafts."""
    from trioserve.models.loading import load_model

    speculation = SpeculationConfig(
        load_draft=lambda: load_model(model_dir), draft_prefill_chunk=32
    )
    async with open_engine(parallel=2, speculation=speculation) as engine:
        request = chat_request(engine, "Count from one to twenty in words.", max_tokens=40)
        assert len(request.prompt_tokens) > 32
        plain = await collect(engine, request)
        assert drafts(engine) == {}
        drafted = await collect(engine, replace(request, speculation="draft-model"))
        counts = drafts(engine)
    assert tokens_of(drafted) == tokens_of(plain)
    proposed, accepted = counts["draft-model"]
    assert accepted >= 20 and accepted >= 0.8 * proposed, counts

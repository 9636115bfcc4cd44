"""The gauges of the inference gateway's model server protocol: what they read, their form
(what an endpoint picker parses), the KV-cache utilisation's definition, and the worker's
count of the tokens its batch holds. tests/integration/test_reliability.py reads them from a
real server."""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trioserve.engine.scheduler import EngineStats
from trioserve.engine.worker import Worker, WorkerConfig, WorkerSnapshot
from trioserve.metrics import KV_CACHE_USAGE, REQUESTS_RUNNING, REQUESTS_WAITING, Metrics

PROTOCOL = (REQUESTS_WAITING, REQUESTS_RUNNING, KV_CACHE_USAGE)
GUIDE = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def stats(busy=1, queued=3, kv_tokens=300, slots=2, context=1000) -> EngineStats:
    worker = WorkerSnapshot(in_batch=busy, tracked=busy, kv_tokens=kv_tokens)
    return EngineStats(True, slots, busy, queued, worker, context_tokens=context)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(name, labels): value}`` of every sample, and the check that each family parses."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize(
    ("kv_tokens", "slots", "context", "usage"),
    [
        (0, 2, 1000, 0.0),
        (300, 2, 1000, 0.15),  # 300 of 2 x 1000 tokens
        (2000, 2, 1000, 1.0),  # every slot at the context length
        (2500, 2, 1000, 1.0),  # never above 1, whatever a report says
        (300, 2, 0, 0.0),  # the context length is not known: nothing to measure against
    ],
)
def test_kv_cache_usage_is_the_held_tokens_over_slots_times_the_context(
    kv_tokens, slots, context, usage
):
    assert stats(kv_tokens=kv_tokens, slots=slots, context=context).kv_cache_usage == usage


def test_the_protocol_gauges_read_the_queue_the_busy_slots_and_the_kv_usage():
    text = Metrics(lambda: [("m", stats())]).render().decode()
    values = samples(text)
    assert values[(REQUESTS_WAITING, ())] == 3  # the requests waiting for a slot
    assert values[(REQUESTS_RUNNING, ())] == 1  # the requests holding one
    assert values[(KV_CACHE_USAGE, ())] == 0.15
    # The same figures as trioserve's own gauges, which stay.
    assert values[("trioserve_queued_requests", ())] == 3
    assert values[("trioserve_slots_busy", ())] == 1


def test_the_blas_thread_gauge_reads_the_worker_and_zero_when_trioserve_never_set_it():
    worker = WorkerSnapshot(blas_threads=2, blas_thread_changes=3)
    chosen = EngineStats(True, 2, 0, 0, worker, context_tokens=1000)
    assert (
        samples(Metrics(lambda: [("m", chosen)]).render().decode())[("trioserve_blas_threads", ())]
        == 2
    )
    assert (
        samples(Metrics(lambda: [("m", stats())]).render().decode())[("trioserve_blas_threads", ())]
        == 0
    )


def test_their_form_is_what_an_endpoint_picker_reads():
    """Gauges (the protocol's type), one unlabelled series each for one model, named in vLLM's
    form (``<server>:<name>``, a valid Prometheus name), with a help text that defines them."""
    text = Metrics(lambda: [("m", stats())]).render().decode()
    found = families(text)
    for name in PROTOCOL:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name) and name.startswith("trioserve:")
        assert found[name].type == "gauge", name
        assert f"# TYPE {name} gauge" in text
        assert len(found[name].samples) == 1
    kv_help = found[KV_CACHE_USAGE].documentation
    assert "0 to 1" in kv_help and "context length" in kv_help and "prefix-cache" in kv_help


def test_with_several_models_each_has_its_own_series_and_an_unloaded_one_reads_zero():
    metrics = Metrics(lambda: [("a", stats()), ("b", None)], per_model=True)
    values = samples(metrics.render().decode())
    a, b = (("model", "a"),), (("model", "b"),)
    assert values[(REQUESTS_WAITING, a)] == 3 and values[(REQUESTS_WAITING, b)] == 0
    assert values[(REQUESTS_RUNNING, a)] == 1 and values[(REQUESTS_RUNNING, b)] == 0
    assert values[(KV_CACHE_USAGE, a)] == 0.15 and values[(KV_CACHE_USAGE, b)] == 0


def test_the_gauges_follow_the_engine_from_scrape_to_scrape():
    now = [stats(busy=2, queued=1, kv_tokens=1500)]
    metrics = Metrics(lambda: [("m", now[0])])
    assert samples(metrics.render().decode())[(KV_CACHE_USAGE, ())] == 0.75
    now[0] = stats(busy=0, queued=0, kv_tokens=0)  # idle again
    values = samples(metrics.render().decode())
    assert [values[(name, ())] for name in PROTOCOL] == [0, 0, 0]


def test_the_deploy_guide_points_an_endpoint_picker_at_these_very_names():
    """deploy/README.md's EPP configuration (not run here: no Kubernetes) names them right,
    in both of its forms: the extractor's engineConfigs and the older flags."""
    guide = GUIDE.read_text()
    fields = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec")
    flags = (
        "--total-queued-requests-metric",
        "--total-running-requests-metric",
        "--kv-cache-usage-percentage-metric",
    )
    for field, flag, name in zip(fields, flags, PROTOCOL, strict=True):
        assert f'{field}: "{name}"' in guide
        assert f"{flag}={name}\n" in guide


class _Batch:
    """A stage of mlx-lm's BatchGenerator as the count reads it: the token list per sequence."""

    def __init__(self, *lengths: int) -> None:
        self.tokens = [list(range(n)) for n in lengths]

    def __len__(self) -> int:
        return len(self.tokens)


def _queued(uid: int, prefix_hit: int) -> tuple:
    """An ``_unprocessed_sequences`` entry: (uid, segments, max_tokens, cache, all_tokens,
    sampler, processors, stop sequences); all_tokens is what its cache holds already."""
    return (uid, [[1, 2, 3]], 8, None, list(range(prefix_hit)), None, [], None)


def test_the_worker_counts_the_tokens_every_stage_of_the_batch_holds():
    worker = Worker(WorkerConfig(parallel=4, prefill_step_size=16), lambda *args: None)
    worker._gen = SimpleNamespace(
        _counters=SimpleNamespace(prompt_tokens=0, generation_tokens=0),
        _unprocessed_sequences=deque([_queued(0, 0), _queued(1, 40)]),  # a prefix-cache hit
        _prompt_batch=_Batch(64),  # one chunk of its prompt read
        _generation_batch=_Batch(120, 7),  # decoding: prompt plus tokens so far
    )
    snapshot = worker._snapshot_now()
    assert snapshot.kv_tokens == 40 + 64 + 120 + 7
    assert snapshot.in_batch == 5
    worker._gen = SimpleNamespace(
        _counters=worker._gen._counters,
        _unprocessed_sequences=deque(),
        _prompt_batch=_Batch(),
        _generation_batch=_Batch(),
    )
    assert worker._snapshot_now().kv_tokens == 0  # all gone: nothing held

"""The parts of ``tools/bench_server.py``: trioserve beside mlx_lm.server, over HTTP.

- ``servers.py``: the two server processes on the same weights, the same BLAS and threads;
- ``client.py``: one streamed chat request, each token stamped as it arrives;
- ``workloads.py``: the scenarios (concurrent streams, long-prompt TTFT, a long prompt that
  interferes with running streams, hang-ups), each run once on one server;
- ``results.py``: every figure of every run, per server, and the per-run details;
- ``run.py``: the whole run: warm-up, checks, idle waits, scenarios interleaved over repeats;
- ``limits.py``: the in-process limit with no HTTP (``tools/bench_engine.py`` in a child);
- ``report.py`` and ``plot.py``: the table and the PNG.

Shared with the other benchmarks: ``tools/bench_common.py`` (prompts, statistics, /proc).
"""

"""trioserve beside mlx-lm's own server (and llama.cpp's), over HTTP, on one model (issue 6 §1).

Why: mlx_lm.server is what a user would run instead, and on Linux llama.cpp's llama-server
(``--llama-server PATH``: a third column, on the GGUF file the model was converted from, with
its own kernels and quantization). trioserve and the peer run one converted model directory
(float32, OpenBLAS in both: LD_PRELOAD for the peer, checked in /proc/PID/maps). Every server
gets the same streamed chat requests (temperature 0, max_tokens 128), interleaved, each figure
``--repeat`` times; the report has min, median and the ratios of medians, trioserve / peer
and trioserve / llama-server.
It also measures the limit with no HTTP (raw mlx-lm, through tools/bench_engine.py).

Timing is client-side: tokens are the SSE chunks with content, stamped as they arrive. Every
prompt carries a fresh nonce, so no prompt cache answers it. Before each run, the driver waits
until both servers are idle (their own CPU time, from /proc), so one server's leftovers never
land in the other's figures. The figures are only as quiet as the machine: note its load
(printed) and rerun on an idle machine for numbers worth quoting.

The parts live in tools/bench/ (servers, client, workloads, results, run, limits, report,
plot); this file is the command line.

Usage:
    .venv/bin/python tools/bench_server.py [--repeat 3] [--json OUT] [--plot OUT.png]
    .venv/bin/python tools/bench_server.py --quick            # a smoke check, a few minutes
    .venv/bin/python tools/bench_server.py --only trioserve   # or --only peer
    .venv/bin/python tools/bench_server.py --llama-server "$(tools/build_llama_server.sh)"
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from bench.limits import measure_limits
from bench.plot import plot
from bench.report import print_report, summary
from bench.results import Results
from bench.run import Bench
from bench.servers import SERVER_NAMES, make_servers
from bench.workloads import CONCURRENCY, SCENARIOS
from bench_common import default_model_dir, machine_line


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="mlx-lm model dir (default: the embedded model)")
    p.add_argument("--repeat", type=int, help="runs per figure (default 3; --quick: 1)")
    p.add_argument("--max-tokens", type=int, help="per request (default 128; --quick: 32)")
    p.add_argument("--quick", action="store_true", help="a smoke check: fewer, shorter runs")
    p.add_argument("--only", choices=SERVER_NAMES, help="run one server only")
    p.add_argument(
        "--llama-server",
        type=Path,
        metavar="PATH",
        help="llama.cpp's llama-server binary: a third column (tools/build_llama_server.sh"
        " builds one)",
    )
    p.add_argument(
        "--gguf",
        type=Path,
        help="the GGUF file llama-server serves (default: the embedded model's; needed with"
        " --model)",
    )
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    p.add_argument(
        "--prefill-step-size", type=int, default=64, help="for trioserve (its default: 64)"
    )
    p.add_argument(
        "--peer-prefill-step-size",
        type=int,
        default=256,
        help="for mlx_lm.server: 256 gave its best TTFT here (8.4 s against 12.7 s at 2048)",
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS_NUM_THREADS for every server (default: none; trioserve then runs "
        "--blas-threads auto, mlx_lm.server OpenBLAS's default of every core)",
    )
    p.add_argument(
        "--ttft-lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        help="long-prompt TTFT targets in tokens (default 1500; --quick: 600)",
    )
    p.add_argument(
        "--interfere-prompt",
        type=int,
        help="tokens of the prompt that arrives mid-stream and of the hung-up prefill"
        " (default 3000; --quick: 1200)",
    )
    p.add_argument("--interference-streams", type=int, default=2)
    p.add_argument(
        "--seed-temperature",
        type=float,
        default=0.7,
        help="temperature of the seeded runs (at 0, trioserve ignores the seed)",
    )
    p.add_argument("--hangup-after", type=float, default=2.0, help="s into the prefill")
    p.add_argument("--hangup-tokens", type=int, default=10, help="tokens into the decode")
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help=f"a comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--no-limits", action="store_true", help="skip the in-process limit")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--idle-timeout", type=float, default=180.0)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--deadline-min", type=float, default=120.0, help="the whole run's bound")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="run nothing: draw --plot from the figures a run wrote with --json",
    )
    args = p.parse_args()
    if args.replot and not args.plot:
        p.error("--replot needs --plot OUT.png")
    if args.only == "llama-server" and not args.llama_server:
        p.error("--only llama-server needs --llama-server PATH")
    if args.llama_server and args.model and not args.gguf:
        p.error("with --model, say which GGUF file llama-server serves: --gguf")
    if args.llama_server and not args.llama_server.is_file():
        p.error(f"--llama-server {args.llama_server}: no such file")
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.max_tokens = args.max_tokens or (32 if q else 128)
    args.ttft_lengths = args.ttft_lengths or ([600] if q else [1500])
    args.interfere_prompt = args.interfere_prompt or (1200 if q else 3000)
    # Background streams must outlast the long prompt's prefill.
    args.background_tokens = 2048
    return args


def replot(saved: Path, out: Path) -> int:
    """The plot of an earlier run, from its --json figures (matplotlib may be installed
    after the run)."""
    data = json.loads(saved.read_text())
    results = Results(list(data["values"]))
    results.values = data["values"]
    results.prompt_sizes = data["prompt_tokens"]
    servers = [SimpleNamespace(name=name) for name in data["values"]]
    plot(results, servers, argparse.Namespace(**data["args"]), out, machine=data["machine"])
    return 0


def main() -> int:
    args = parse_args()
    if args.replot:
        return replot(args.replot, args.plot)
    args.model_dir = args.model or default_model_dir()
    from transformers import AutoTokenizer  # the same tokenizer files both servers load

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp:
        tmp_dir = Path(tmp)
        limits = None
        if not args.no_limits:
            limits = measure_limits(args, args.model_dir, tmp_dir / "limits.json")
        servers = make_servers(args, args.model_dir, tmp_dir, slots=max(CONCURRENCY))
        bench = Bench(args, servers, tokenizer)
        try:
            for s in servers:
                s.start()
            for s in servers:
                s.wait_healthy(args.start_timeout)

            async def bounded() -> None:
                with trio.fail_after(args.deadline_min * 60):
                    await bench.run()

            trio.run(bounded)
        except BaseException:
            for s in servers:
                print(f"--- {s.name} log (tail) ---\n{s.log_tail(15)}", file=sys.stderr)
            raise
        finally:
            for s in servers:
                s.stop(timeout_s=10)
    results = bench.results
    print_report(results, servers, args, limits)
    if args.json:
        payload = {
            "machine": machine_line(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "servers": {s.name: s.argv for s in servers},
            "values": results.values,
            "prompt_tokens": results.prompt_sizes,
            "summary": summary(results, args),
            "limits": limits,
            "details": results.details,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"raw figures written to {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, servers, args, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``trioserve`` command line: ``serve`` (default), ``generate``, ``convert``, ``prepare``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trioserve import __version__
from trioserve.config import DTYPES, SPECULATION_MODES

DESCRIPTION = """\
A local, OpenAI-compatible LLM server on Trio and MLX.

Without a command, `trioserve` runs `serve` on the embedded SmolLM2-135M-Instruct model.
Point any OpenAI client at http://127.0.0.1:8080/v1 (no API key needed unless --api-key).
"""

COMMANDS = {"serve", "generate", "convert", "prepare"}

DTYPE_HELP = (
    "auto (default) is float32 on the CPU, where MLX's quantized kernels are slower, and "
    "quantized on a GPU; quantized keeps Q4_0/Q4_1/Q8_0 tensors 4- or 8-bit (MLX's affine "
    "group-32 format) and expands the other quantizations"
)

MODEL_HELP = (
    "the model to serve, in one of four forms: a local mlx-lm directory "
    "(./Qwen3-4B-4bit); a Hugging Face repo id, optionally @revision "
    "(mlx-community/Qwen3-4B-4bit, owner/name@main), from huggingface_hub's cache or "
    "downloaded into it (HF_HOME, HF_HUB_OFFLINE and HF_TOKEN apply); a .gguf file "
    "(./model.Q4_0.gguf), converted on first use into the cache "
    "($XDG_CACHE_HOME/trioserve/models); or a model Ollama has pulled "
    "(ollama:qwen2.5-coder:1.5b, from $OLLAMA_MODELS or ~/.ollama/models), converted "
    "likewise. An existing path wins over the other readings. "
    "Default: the embedded SmolLM2-135M-Instruct"
)

SEVERAL_MODELS_HELP = (
    ". Repeat --model to serve several models, each SOURCE or NAME=SOURCE (NAME is the "
    "`model` clients send; default: the source's own name). NAME=SOURCE is split at the "
    "first '=' only when what comes before it is a plain name (letters, digits, '.', '_', "
    "'-'; no '/' or ':') and the whole value is not an existing path, so "
    "ollama:qwen2.5:1.5b, owner/name and ./a=b stay sources. With several, the first is "
    "loaded at start and the others when a request names them (see --max-loaded-models, "
    "--model-ttl)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trioserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP server (the default command)")
    _add_model_args(serve, several=True)
    _add_serve_args(serve)

    gen = sub.add_parser("generate", help="answer one prompt on the terminal and exit")
    gen.add_argument("prompt", help="the user message, e.g. 'What is the capital of France?'")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128, help="cap on generated tokens")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    gen.add_argument("--seed", type=int, default=None, help="seed for sampled answers")
    _add_log_arg(gen, default="warning")

    conv = sub.add_parser(
        "convert", help="convert a llama-architecture GGUF file into an mlx-lm model directory"
    )
    conv.add_argument(
        "gguf",
        help="the .gguf file: llama, qwen2, qwen3, gemma3 or phi3, any quantization "
        "(Q4_K_M, Q8_0, IQ4_XS, F16, ...)",
    )
    conv.add_argument("out_dir", help="the directory to create; must not exist yet")
    conv.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)

    prep = sub.add_parser(
        "prepare",
        help="resolve --model (download or convert it into the cache), print its mlx-lm "
        "directory, then exit; the embedded model without --model",
    )
    _add_model_args(prep)
    return parser


def _add_model_args(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None,
        action="append" if several else "store",
        metavar="[NAME=]MODEL" if several else "MODEL",
        help=MODEL_HELP + (SEVERAL_MODELS_HELP if several else ""),
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights' dtype when a GGUF (the embedded model, a .gguf file, an Ollama model) "
        f"is converted: {DTYPE_HELP}",
    )


def _add_log_arg(p: argparse.ArgumentParser, default: str = "info") -> None:
    p.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="default: %(default)s",
    )


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
    p.add_argument(
        "--parallel",
        type=int,
        default=8,
        help="sequences decoded together in one batch; more requests wait in a FIFO queue "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=64,
        help="prompt tokens processed per step while other streams decode: they wait for "
        "each step, so smaller steps keep them flowing (default: %(default)s)",
    )
    p.add_argument(
        "--solo-prefill-step-size",
        type=int,
        default=256,
        help="prompt tokens per step when no stream is decoding: larger steps read a prompt "
        "faster (on a 2-core CPU 256 was ~6%% faster than 64); a hang-up still stops the "
        "step between two layers; 0: the same as --prefill-step-size (default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="generated-token cap for requests that name none (default: %(default)s)",
    )
    p.add_argument(
        "--ctx-size",
        type=int,
        default=None,
        metavar="TOKENS",
        help="bound on prompt plus generated tokens for every request (and so the KV memory "
        "per slot); default: the model's context length",
    )
    p.add_argument(
        "--default-temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="temperature for requests that name none, 0-2; OpenAI's default is 1.0, and "
        "agents that never send one (Codex CLI) answer more reliably from a small model at "
        "0 (greedy) (default: %(default)s)",
    )
    p.add_argument(
        "--cors",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="allow browsers from these origins ('*' for any); no CORS headers without it",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TRIOSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TRIOSERVE_API_KEY; none)",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=[],
        metavar="HOST",
        help="Host header names to serve besides localhost, 127.0.0.1 and [::1] ('*' for any; "
        "'*.example.com' for subdomains). Without it, a server on a loopback address with no "
        "--api-key answers 403 to any other Host, so a web page cannot reach it through DNS "
        "rebinding; with it, the list is checked whatever the address or key. Needed behind a "
        "reverse proxy that passes its own Host on",
    )
    p.add_argument(
        "--any-content-type",
        dest="require_json_content_type",
        action="store_false",
        help="accept POST bodies whatever their Content-Type; by default a POST needs "
        "'Content-Type: application/json' (else 415), so a web page cannot send one "
        "cross-origin without a CORS preflight",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=2.0,
        help="seconds between prefill-progress events for clients that opt in with the "
        "X-SwiftLM-Prefill-Progress header (default: %(default)s)",
    )
    p.add_argument(
        "--sse-keepalive",
        type=float,
        default=0.0,
        help="seconds between ': keepalive' SSE comment lines while a stream is silent; "
        "0 turns them off, the default, for strict clients",
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Jinja chat template that overrides the model's own (e.g. to render tools or "
        "<think> blocks); default: the model's template",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=512,
        help="memory for reusing the KV cache of prompt prefixes seen before (agents resend "
        "the whole conversation each turn); 0 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--speculation",
        choices=SPECULATION_MODES,
        default="off",
        help="speculative decoding for requests that do not choose: prompt-lookup drafts "
        "the continuation of a match of the last tokens in the prompt or the output, "
        "verified in the batch (greedy output unchanged; fastest when the answer repeats the "
        "prompt, e.g. code edits); draft-model drafts with --draft-model; a request's "
        "`prediction` always drafts "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--draft-model",
        metavar="SOURCE",
        default=None,
        help="a smaller model with the same tokenizer (any source --model accepts) that "
        "drafts tokens for requests with speculation draft-model (or all of them, with "
        "--speculation draft-model); checked against the model's tokenizer at start-up",
    )
    p.add_argument(
        "--speculation-draft-tokens",
        type=int,
        default=10,
        help="the most draft tokens one sequence proposes per step (default: %(default)s)",
    )
    p.add_argument(
        "--blas-threads",
        default=None,
        metavar="auto|N",
        help="OpenBLAS threads per matmul. auto: the cores other processes leave free, "
        "checked every 0.5 s and changed between steps (faster on an otherwise quiet "
        "machine, one thread as soon as something else is busy); N: always N. Default: "
        "OPENBLAS_NUM_THREADS if set, else auto. 1 and 2 threads round some sums "
        "differently, so a greedy answer may (rarely) differ with the count",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests allowed to wait for a slot; more get 429 with Retry-After "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=300.0,
        help="seconds a request may wait for a slot before it gets an error; 0: no limit "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        help="seconds a stream may stay blocked on a client that reads nothing before it is "
        "dropped and its slot freed, and a connection's write may make no progress before "
        "the connection is reset; 0: never (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they end "
        "with an error; a second signal exits at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        default=1,
        metavar="N",
        help="with several --model: how many may be loaded at once; loading another first "
        "unloads the least recently used one that no request is using, and waits while every "
        "loaded one is in use. A load whose weights exceed the free memory (MemAvailable plus "
        "what the unload frees) is refused with a 503 instead of swapping. Default 1: two "
        "models rarely fit a small machine, and a reload costs seconds, a swap storm minutes "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--model-ttl",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with several --model: unload a model no request has used for this long; "
        "0: never (default: %(default)s)",
    )
    p.add_argument(
        "--rank-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="under mlx.launch (one model over several ranks): how long rank 0 waits for "
        "the other ranks before it fails its requests and exits non-zero; a rank that died "
        "is noticed within about a second (default: %(default)s)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model's name in /v1/models and in answers (default: the repo id, Ollama "
        "name, file stem or directory name of --model)",
    )
    p.add_argument(
        "--model-alias",
        dest="model_aliases",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="model names (shell patterns) that /v1/messages requests may ask for and get the "
        "served model, e.g. --model-alias 'claude-*' for Claude Code; the answer's model is "
        "the name asked for (default: only the served model's name)",
    )
    p.add_argument(
        "--responses-store-size",
        type=int,
        default=256,
        metavar="N",
        help="finished /v1/responses answers kept in memory (when a request asks to store "
        "it) for previous_response_id and GET /v1/responses/ID; 0 keeps none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--responses-store-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long a stored response is kept (default: %(default)s)",
    )
    p.add_argument(
        "--debug-endpoints",
        action="store_true",
        help="serve /debug/state (task, thread and memory counts) for leak checks; off by default",
    )
    p.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        help="do not serve the web playground at / (the API only)",
    )
    _add_log_arg(p)


def main(argv: list[str] | None = None, *, worker_factory: Any = None) -> int:
    """Run the command line. ``worker_factory`` replaces the MLX worker of ``serve``
    (``python -m trioserve.testing.faults`` uses it to inject faults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in {"-h", "--help", "--version"}):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    config = None
    if args.command == "serve":  # before the model: a bad value fails at once, on one line
        from trioserve.config import ConfigError

        try:
            config = _serve_config(args)
        except ConfigError as exc:
            flag = FLAGS.get(exc.field, exc.field)
            print(f"trioserve serve: error: {flag} {exc.reason}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "convert":
        from trioserve.models.gguf import concrete_dtype, run_convert_cli

        return run_convert_cli(args.gguf, args.out_dir, concrete_dtype(args.dtype))
    group = None
    if args.command == "serve":
        try:
            group = _join_ranks(config)
        except Exception as exc:  # mlx.launch's group could not be formed, or a bad config
            print(f"trioserve serve: error: {exc}", file=sys.stderr)
            return 2
    several = config is not None and bool(config.models)  # each resolved when it loads
    try:
        resolved = None if several else _resolve(args)
        if config is not None and config.draft_model:  # its errors in one line too, now
            import dataclasses

            from trioserve.models.sources import resolve

            draft = resolve(config.draft_model, dtype=args.dtype, progress=_progress)
            config = dataclasses.replace(config, draft_model=str(draft.path))
        if getattr(args, "chat_template", None) is not None:  # fail now, not per request
            from trioserve.models.chat_template import read_chat_template

            read_chat_template(args.chat_template)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, no traceback, for every model problem
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if several:
        from trioserve.server import run_server

        assert config is not None
        return run_server(config, worker_factory=worker_factory)
    assert resolved is not None
    if args.command == "prepare":
        print(resolved.path)
        return 0
    if args.command == "generate":
        return _run_generate(args, resolved.path)
    from dataclasses import replace

    from trioserve.server import run_server

    assert config is not None
    # Resolved once, here: the server loads the directory and serves it under its name
    # (a Hub repo id, an Ollama name) without asking the Hub again.
    config = replace(
        config,
        model=resolved.path,
        served_model_name=config.served_model_name or _single_name(args) or resolved.name,
    )
    if group is None:
        return run_server(config, worker_factory=worker_factory)
    if not group.leader:
        return _exit_rank(_follow(config, resolved.path, group))
    return _exit_rank(run_server(config, worker_factory=worker_factory))


def _join_ranks(config: Any):  # -> RankGroup | None
    """Under mlx.launch: join the rank group, and refuse what one sharded model cannot do."""
    from trioserve.engine.distributed.group import join_group

    group = join_group()
    if group is None:
        return None
    if config.models:
        raise ValueError("one model only under mlx.launch: every rank holds a shard of it")
    return group


def _follow(config: Any, model_dir: Path, group: Any) -> int:
    """Ranks other than 0: no HTTP, only the MLX worker, in step with rank 0."""
    import signal

    from trioserve.api.app import engine_config
    from trioserve.engine.distributed.follower import run_follower
    from trioserve.models.loading import model_context_length

    # Ctrl-C reaches every rank of the terminal's process group: rank 0 drains and then
    # tells the others to stop; a rank that died at once would fail rank 0's streams.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = engine_config(config, model_dir, model_context_length(model_dir))
    return run_follower(engine.worker_config(), group)


def _exit_rank(status: int) -> int:
    """A rank's exit. After a failure a worker thread may be stuck inside a collective,
    where nothing can stop it, and a normal exit would wait for it: leave at once."""
    if status != 0:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status


def _progress(message: str) -> None:
    """Conversion steps on stderr, so a first start that takes long says why."""
    print(message, file=sys.stderr, flush=True)


def _resolve(args: argparse.Namespace):  # -> ResolvedModel
    from trioserve.models.sources import resolve

    return resolve(_single_entry(args).source, dtype=args.dtype, progress=_progress)


def _single_entry(args: argparse.Namespace):  # -> ModelEntry
    """The one --model of `generate`, `prepare`, or a one-model `serve` (NAME= taken off)."""
    from trioserve.config import ModelEntry, parse_model_entry

    model = getattr(args, "model", None)
    if isinstance(model, list):  # serve's --model is repeatable
        model = model[0] if model else None
    if model is None or args.command != "serve":
        return ModelEntry(None, model)
    return parse_model_entry(model)


def _single_name(args: argparse.Namespace) -> str | None:
    return _single_entry(args).name


def _run_generate(args: argparse.Namespace, model_dir: Path) -> int:
    import trio

    from trioserve.blas import log_blas_report
    from trioserve.oneshot import generate

    log_blas_report(logging.getLogger("trioserve"))
    return trio.run(
        lambda: generate(
            model_dir,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    )


# ServerConfig fields by the flag that sets them, so a ConfigError names what the user typed.
FLAGS = {
    "port": "--port",
    "host": "--host",
    "parallel": "--parallel",
    "prefill_step_size": "--prefill-step-size",
    "solo_prefill_step_size": "--solo-prefill-step-size",
    "max_tokens": "--max-tokens",
    "ctx_size": "--ctx-size",
    "cors_origins": "--cors",
    "allowed_hosts": "--allowed-hosts",
    "heartbeat_interval_s": "--heartbeat-interval",
    "sse_keepalive_s": "--sse-keepalive",
    "max_queue": "--max-queue",
    "prefix_cache_mb": "--prefix-cache-mb",
    "speculation": "--speculation",
    "speculation_draft_tokens": "--speculation-draft-tokens",
    "draft_model": "--draft-model",
    "blas_threads": "--blas-threads",
    "queue_timeout_s": "--queue-timeout",
    "send_timeout_s": "--send-timeout",
    "shutdown_grace_s": "--shutdown-grace",
    "default_temperature": "--default-temperature",
    "model_aliases": "--model-alias",
    "served_model_name": "--served-model-name",
    "models": "--model",
    "max_loaded_models": "--max-loaded-models",
    "model_ttl_s": "--model-ttl",
    "rank_timeout_s": "--rank-timeout",
    "responses_store_size": "--responses-store-size",
    "responses_store_ttl_s": "--responses-store-ttl",
}


def _serve_config(args: argparse.Namespace, model_dir: Path | None = None):  # -> ServerConfig
    """The ``serve`` flags as a ``ServerConfig``; raises ``ConfigError`` for a bad value.
    (``create_app`` resolves the model itself, so ``model_dir`` is not needed.)"""
    from trioserve.config import ServerConfig

    del model_dir
    models = list(args.model or [])
    return ServerConfig(
        model=models[0] if len(models) == 1 else None,
        models=tuple(models) if len(models) > 1 else (),
        max_loaded_models=args.max_loaded_models,
        model_ttl_s=args.model_ttl,
        rank_timeout_s=args.rank_timeout,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        parallel=args.parallel,
        prefill_step_size=args.prefill_step_size,
        solo_prefill_step_size=args.solo_prefill_step_size,
        max_tokens=args.max_tokens,
        default_temperature=args.default_temperature,
        model_aliases=tuple(args.model_aliases),
        served_model_name=args.served_model_name,
        ctx_size=args.ctx_size,
        cors_origins=tuple(args.cors),
        allowed_hosts=tuple(args.allowed_hosts),
        require_json_content_type=args.require_json_content_type,
        api_key=args.api_key,
        heartbeat_interval_s=args.heartbeat_interval,
        sse_keepalive_s=args.sse_keepalive,
        log_level=args.log_level,
        max_queue=args.max_queue,
        prefix_cache_mb=args.prefix_cache_mb,
        speculation=args.speculation,
        speculation_draft_tokens=args.speculation_draft_tokens,
        draft_model=args.draft_model,
        blas_threads=args.blas_threads,
        queue_timeout_s=args.queue_timeout or None,  # 0: no limit
        send_timeout_s=args.send_timeout,
        shutdown_grace_s=args.shutdown_grace,
        responses_store_size=args.responses_store_size,
        responses_store_ttl_s=args.responses_store_ttl,
        debug_endpoints=args.debug_endpoints,
        ui=args.ui,
        chat_template=args.chat_template,
    )

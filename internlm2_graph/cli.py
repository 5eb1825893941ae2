"""Command line: `python -m internlm2_graph` / `internlm2-graph`.

Build flags match `onnxruntime_genai.models.builder` (-i -o -p -e --extra_options), so the
commands users know work with the module name swapped. `verify`, `inspect` and `chat` are
subcommands, and `eval` scores a folder on your text.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from internlm2_graph import speculative
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import EXECUTION_PROVIDERS, OPTIONS, PRECISIONS

SUBCOMMANDS = ("build", "verify", "inspect", "chat", "eval", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph",
        description="Convert an InternLM2/InternLM2.5 checkpoint into an ONNX Runtime GenAI "
        "folder.",
        epilog="Also: `internlm2-graph verify OUTPUT --against CHECKPOINT --text FILE`, "
        "`internlm2-graph inspect CHECKPOINT`, `internlm2-graph chat OUTPUT`, "
        "`internlm2-graph eval OUTPUT --text FILE [--reference FOLDER]`, "
        "`internlm2-graph serve OUTPUT`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, help="checkpoint folder or hub id")
    parser.add_argument("-o", "--output", required=True, help="folder to write")
    parser.add_argument("-p", "--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("-e", "--execution_provider", default="cpu", choices=EXECUTION_PROVIDERS)
    parser.add_argument("-c", "--cache_dir", default=None, help="Hugging Face cache folder")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    parser.add_argument(
        "--extra_options",
        nargs="+",
        metavar="KEY=VALUE",
        help="options as named by the onnxruntime-genai builder:\n"
        + "\n".join(f"  {k}: {v}" for k, v in {**OPTIONS, **speculative.OPTIONS}.items()),
    )
    parser.add_argument(
        "--draft",
        metavar="int4|int8|FOLDER",
        help="also write a draft model for speculative decoding: a quantized copy of the "
        "checkpoint, or a built folder with the same vocabulary (same as --extra_options draft=)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--allow_nonfinite", action="store_true", help="warn instead of failing on NaN/Inf weights"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return parser


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph verify",
        description="Check a built folder: --against runs a few greedy tokens through the model "
        "and the numpy reference; --text compares og.Tokenizer's ids with SentencePiece's on "
        "your text, paragraph by paragraph (paragraphs end at blank lines).",
    )
    parser.add_argument("model", help="the built folder")
    parser.add_argument("--against", help="the checkpoint folder it was built from")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to tokenize both ways")
    parser.add_argument("--prompt", default="The quick brown fox", help="text to start from")
    parser.add_argument("--steps", type=_positive_int, default=8, help="tokens to decode")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference|")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph inspect",
        description="Config, parameter count, and memory per precision for a checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or hub id")
    parser.add_argument(
        "-p",
        "--precision",
        choices=PRECISIONS,
        help="also list how a build of this precision stores each weight matrix",
    )
    parser.add_argument("-e", "--execution_provider", default="cpu", choices=EXECUTION_PROVIDERS)
    parser.add_argument(
        "--extra_options", nargs="+", metavar="KEY=VALUE", help="as for a build (quant_preset=...)"
    )
    parser.add_argument(
        "--context",
        type=_positive_int,
        default=None,
        help="KV cache length in tokens (default: the context, at most 4096)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph chat",
        description="Chat with a built folder: type a message, Enter sends it. Ctrl-C stops a "
        "reply, Ctrl-D (or /bye) ends the session, /clear forgets the conversation. Needs a "
        'runtime: pip install "internlm2_graph[cpu]" (or [cuda]).',
    )
    parser.add_argument("model", help="the built folder")
    parser.add_argument("--prompt", help="answer this one message and exit (no interaction)")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=512, help="tokens per reply at most (512)"
    )
    parser.add_argument(
        "--speculative",
        choices=speculative.MODES,
        help="speculative decoding: off, ngram (prompt lookup) or draft (the folder's draft/). "
        "Default: as built, or ngram for greedy replies from a cpu folder built without any "
        "(measured 1.02x or more). Greedy replies stay the same; only the speed changes",
    )
    sampling = parser.add_argument_group(
        "sampling", "default: the folder's genai_config.json `search` (from generation_config)"
    )
    mode = sampling.add_mutually_exclusive_group()
    mode.add_argument(
        "--do-sample", dest="do_sample", action="store_true", default=None, help="sample"
    )
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="no sampling")
    sampling.add_argument(
        "--temperature", type=float, help="turns sampling on unless --greedy; 0 means greedy"
    )
    sampling.add_argument("--top-p", type=float, help="turns sampling on unless --greedy")
    sampling.add_argument("--top-k", type=int, help="turns sampling on unless --greedy")
    sampling.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph eval",
        description="Teacher-forced perplexity of a built folder on your text; with --reference "
        "(e.g. its fp32 build) also the KL divergence to it and top-1 agreement, per token. Runs "
        "the folder's graph with onnxruntime: needs the cpu or cuda extra.",
    )
    parser.add_argument("model", help="the built folder")
    parser.add_argument(
        "--text",
        metavar="FILE",
        required=True,
        help="UTF-8 text (encoded with the folder's tokenizer) or a JSON list of token ids",
    )
    parser.add_argument("--reference", metavar="FOLDER", help="a built folder to compare with")
    parser.add_argument(
        "--window", type=_positive_int, default=1024, help="tokens per window (1024)"
    )
    parser.add_argument(
        "--chunk",
        type=_positive_int,
        help="feed each window this many tokens at a time, so the model reads its KV cache back",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph serve",
        description="Serve a built folder over HTTP with OpenAI's API (/v1/chat/completions, "
        "/v1/completions, /v1/models) and InternLM2's tool calls. Needs "
        'pip install "internlm2_graph[serve]" beside a runtime ([cpu] or [cuda]).',
    )
    parser.add_argument("model", help="the built folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=_positive_int, default=8000, help="port (8000)")
    parser.add_argument("--model-name", help="the model id clients send (default: folder name)")
    parser.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=None,
        help="requests batched together by a folder without a paged graph (16)",
    )
    parser.add_argument(
        "--max-length",
        type=_positive_int,
        default=None,
        help="tokens per request, prompt and reply (default: genai_config search.max_length); "
        "a static batch holds a KV cache of max-batch-size x max-length tokens",
    )
    parser.add_argument(
        "--scheduler",
        choices=("auto", "engine", "generator"),
        default="auto",
        help="engine: og.Engine; generator: batches of og.Generator; auto (default): og.Engine "
        "for a paged folder, generator batches otherwise (og's static engine batches 4 at most)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="a static batch waits this long after each request for another before it starts "
        "(20; 0 for a paged folder)",
    )
    ray = parser.add_argument_group(
        'replicas on Ray Serve (one engine per GPU; needs pip install "internlm2_graph[cluster]")'
    )
    ray.add_argument(
        "--replicas", type=_positive_int, help="engines to run (default: one per --devices GPU)"
    )
    ray.add_argument(
        "--devices", type=_devices, help="GPUs of this host for the replicas, e.g. 0,1 (CUDA)"
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=_gpu_share,
        help="GPU share of a replica, e.g. 0.5: two on one card (default: what packs, or 1)",
    )
    ray.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    ray.add_argument(
        "--max-ongoing-requests",
        type=_positive_int,
        default=256,
        help="requests a replica takes at once before Ray queues more for it (256)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


PARSERS = {
    "build": build_parser,
    "verify": verify_parser,
    "inspect": inspect_parser,
    "chat": chat_parser,
    "eval": eval_parser,
    "serve": serve_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "build"
    args = PARSERS[command]().parse_args(argv)
    run = {
        "build": _build,
        "verify": _verify,
        "inspect": _inspect,
        "chat": _chat,
        "eval": _eval,
        "serve": _serve,
    }[command]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except (InternLM2GraphError, OSError) as err:
        # Problems with the input, options or disk: one line that says what to do. A traceback
        # would only bury it; --verbose brings it back for bug reports.
        if args.verbose:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped before finishing; nothing was written", file=sys.stderr)
        return 130


def _one_line(err: Exception) -> str:
    if isinstance(err, InternLM2GraphError):
        return str(err)
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{where}{err.strerror or err} (run with --verbose for details)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `warning: ...` lines, without the source line Python would print."""
    print(f"warning: {message}", file=sys.stderr)


def _build(args) -> int:
    from internlm2_graph.convert import build
    from internlm2_graph.progress import Progress

    if args.quiet and not Path(args.input).expanduser().is_dir():
        # A hub download draws its own progress bars; --quiet means those too.
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    extra_options = list(args.extra_options or [])
    if args.draft:
        extra_options.append(f"draft={args.draft}")
    summary = build(
        args.input,
        args.output,
        args.precision,
        args.execution_provider,
        extra_options,
        cache_dir=args.cache_dir,
        revision=args.revision,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        progress=Progress(quiet=args.quiet),
    )
    if not args.quiet:
        print(summary)
    return 0


def _verify(args) -> int:
    from internlm2_graph.runtime import genai
    from internlm2_graph.verify import check_model_folder

    if args.against is None and args.text is None:
        raise InternLM2GraphError(
            "verify needs --against CHECKPOINT (compare logits with the numpy reference), "
            "--text FILE (compare og.Tokenizer with SentencePiece), or both"
        )
    check_model_folder(args.model)
    genai()  # no runtime: say so before the reference forward pass, not after
    ok = True
    if args.against is not None:
        ok = _verify_logits(args) and ok
    if args.text is not None:
        ok = _verify_tokenizer(args) and ok
    return 0 if ok else 1


def _verify_logits(args) -> bool:
    from internlm2_graph.hub import resolve_checkpoint
    from internlm2_graph.verify import encode_prompt, verify

    checkpoint = resolve_checkpoint(args.against)
    verdict = verify(args.model, checkpoint, encode_prompt(args.model, args.prompt), args.steps)
    print(verdict)
    ok = verdict.ok(args.tolerance)
    print("OK" if ok else f"MISMATCH (tolerance {args.tolerance:g})")
    return ok


def _verify_tokenizer(args) -> bool:
    from internlm2_graph.verify import check_tokenizer, read_text

    verdict = check_tokenizer(args.model, read_text(args.text))
    print(verdict)
    return verdict.ok


def _inspect(args) -> int:
    from internlm2_graph.precision import parse_extra_options, resolve_target
    from internlm2_graph.sizes import describe

    target = None
    if args.precision or args.extra_options:
        options = parse_extra_options(args.extra_options)
        target = resolve_target(args.precision or "fp32", args.execution_provider, options)
    print(describe(args.checkpoint, args.context, target))
    return 0


def _chat(args) -> int:
    from internlm2_graph.chat import Chat, default_speculative, repl, say, search_options

    search = search_options(
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    chat = Chat(
        args.model,
        system=args.system,
        search=search,
        max_new_tokens=args.max_new_tokens,
        speculative=args.speculative or default_speculative(args.model, search),
    )
    if args.prompt is not None:
        return 0 if say(chat, args.prompt) else 130
    return repl(chat, args.model)


def _serve(args) -> int:
    try:
        import uvicorn

        from internlm2_graph.serve.app import create_app
    except ModuleNotFoundError as err:
        raise InternLM2GraphError(
            f'serve needs {err.name}, which is not installed: pip install "internlm2_graph[serve]"'
        ) from None
    if args.replicas or args.devices or args.gpus_per_replica or args.address:
        return _serve_replicas(args)
    from internlm2_graph.serve.engine import EngineBackend

    backend = EngineBackend(args.model, **_backend_options(args))
    name = args.model_name or Path(args.model).resolve().name
    print(f"serving {args.model} as {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(create_app(backend, name), host=args.host, port=args.port, log_level="warning")
    finally:
        backend.close()
    return 0


def _backend_options(args) -> dict:
    """EngineBackend's settings from the flags: one engine, or each replica's."""
    return {
        "max_batch_size": args.max_batch_size,
        "max_length": args.max_length,
        "batch_wait_ms": args.batch_wait_ms,
        "scheduler": args.scheduler,
    }


def _serve_replicas(args) -> int:
    from internlm2_graph.runtime import built_for_cuda, check_model_folder
    from internlm2_graph.serve import replicas

    if importlib.util.find_spec("ray") is None:  # not imported here: replicas.start sets it up
        raise InternLM2GraphError(
            "--replicas, --devices and --address run on Ray Serve, which is not installed: "
            'pip install "internlm2_graph[cluster]"'
        )
    check_model_folder(args.model)
    where = replicas.placement(
        built_for_cuda(args.model), args.replicas, args.devices, args.gpus_per_replica, args.address
    )
    options = replicas.ServeOptions(
        model_dir=args.model,
        model_name=args.model_name or Path(args.model).resolve().name,
        host=args.host,
        port=args.port,
        backend=_backend_options(args),
        max_ongoing_requests=args.max_ongoing_requests,
        address=args.address,
    )
    return replicas.serve_replicas(options, where)


def _devices(text: str) -> list[int]:
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        devices = [-1]
    if any(device < 0 for device in devices):
        raise argparse.ArgumentTypeError(f"expected GPU numbers such as 0,1, got {text!r}")
    return devices


def _gpu_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a GPU share in (0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _eval(args) -> int:
    from internlm2_graph import evaluate
    from internlm2_graph.runtime import check_model_folder, genai

    folders = [args.model, *([args.reference] if args.reference else [])]
    for folder in folders:
        check_model_folder(folder)
    genai()  # no runtime: say which extra to install before reading the text
    ids = evaluate.read_ids(args.text, args.model)
    evaluate.check_ids(ids, *folders)
    if args.reference is None:
        ppl = evaluate.perplexity(args.model, ids, args.window, args.chunk)
        print(f"ppl {ppl:.3f}, {len(ids)} tokens")
    else:
        print(evaluate.kl_and_top1(args.model, args.reference, ids, args.window, args.chunk))
    return 0

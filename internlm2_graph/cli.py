"""Command line: `python -m internlm2_graph` / `internlm2-graph`.

Build flags match `onnxruntime_genai.models.builder` (-i -o -p -e --extra_options), so the
commands users know work with the module name swapped. `verify`, `inspect` and `chat` are
subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from internlm2_graph import speculative
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import EXECUTION_PROVIDERS, OPTIONS, PRECISIONS

SUBCOMMANDS = ("build", "verify", "inspect", "chat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2-graph",
        description="Convert an InternLM2/InternLM2.5 checkpoint into an ONNX Runtime GenAI "
        "folder.",
        epilog="Also: `internlm2-graph verify OUTPUT --against CHECKPOINT --text FILE`, "
        "`internlm2-graph inspect CHECKPOINT`, `internlm2-graph chat OUTPUT`.",
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


PARSERS = {
    "build": build_parser,
    "verify": verify_parser,
    "inspect": inspect_parser,
    "chat": chat_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "build"
    args = PARSERS[command]().parse_args(argv)
    run = {"build": _build, "verify": _verify, "inspect": _inspect, "chat": _chat}[command]
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

    runtime, exact, pieces = check_tokenizer(args.model, read_text(args.text))
    print(runtime)
    print(exact)
    print(pieces)
    if exact.differing:
        # The exact path is `tokenizers` on the folder's own files: a difference is a bug.
        print("MISMATCH: exact_tokenizer should always give SentencePiece's ids; please report it")
        return False
    if runtime.differing:
        print(
            "MISMATCH: og.Tokenizer differs on these paragraphs; encode with "
            "internlm2_graph.tokenizer.exact_tokenizer(folder) and pass the ids to og"
        )
        return False
    print("OK")
    return True


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
    from internlm2_graph.chat import Chat, ContextFull, search_options

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
        speculative=args.speculative or speculative.chat_default(args.model, search),
    )
    if args.prompt is not None:
        return 0 if _say(chat, args.prompt) else 130
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"{args.model}: Ctrl-C stops a reply, Ctrl-D or /bye ends", file=sys.stderr)
    while True:
        try:
            text = input(">>> " if interactive else "").strip()
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye ends the session)", file=sys.stderr)
            continue
        if text in ("/bye", "/exit"):
            return 0
        if text == "/clear":
            chat.clear()
        elif text:
            try:
                _say(chat, text)
            except ContextFull as err:
                print(f"error: {err}", file=sys.stderr)


def _say(chat, text: str) -> bool:
    """Stream one reply to stdout; False when Ctrl-C cut it short."""
    try:
        chat.reply(text, lambda piece: print(piece, end="", flush=True))
    except KeyboardInterrupt:
        print(flush=True)
        return False
    print(flush=True)
    return True


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value

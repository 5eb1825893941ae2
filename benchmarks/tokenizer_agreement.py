"""Tokenizer agreement: how often og.Tokenizer and the exact path give SentencePiece's ids.

    python -m benchmarks run quality --param study=tokenizer synthetic=1024,8000 stdlib=true

Per language, the share of paragraphs (split at blank lines) and of SentencePiece's tokens that
each tokenizer reproduces, on tests/data/corpus (Chinese and English Markdown, Python) and, with
stdlib=true, on text shipped with this Python (its docs' topics as English prose, ten stdlib
modules as code). Vocabularies: InternLM v1's published tokenizer.model (../shared/fixtures,
103168 pieces, InternLM2's settings; v1=false leaves it out) and synthetic InternLM2-like ones
of the given sizes.

Tools: "og" is og.Tokenizer on the folder as built now; "og, no Split" the same vocabulary with
the pre-tokenizer builds wrote before (a String Split that never matches, so onnxruntime-
extensions chunks text itself); "exact" is internlm2_graph.tokenizer.exact_tokenizer, and
"tokenizers, file" the `tokenizers` library on tokenizer.json as written (with og's Split). The
oracle is SentencePiece with added tokens matched whole (tokenizer.sentencepiece_encoder).
Rows per vocabulary, language and tool: the share of paragraphs and of tokens that agree, and
the encode seconds of the whole language, paragraph by paragraph; per vocabulary and tool, the
share of the pieces SentencePiece gives as one id for their own text that the tool gives as one
id too (verify.whole_pieces).
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from benchmarks import harness
from benchmarks.rows import Row
from internlm2_graph.runtime import genai
from internlm2_graph.synthetic.tokenizer import train_tokenizer
from internlm2_graph.tokenizer import exact_tokenizer, sentencepiece_encoder, write_tokenizer
from internlm2_graph.verify import agreement, paragraphs, whole_pieces

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "corpus"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "internlm-v1-tokenizer.model"
STDLIB_CODE = (
    "argparse.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "json/decoder.py",
    "pathlib.py",
    "shutil.py",
    "statistics.py",
    "textwrap.py",
    "tokenize.py",
)
# What builds wrote before OG_CHUNKS: a Split on " ", which never matches after the normalizer.
NO_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": False}
PARAMS = {"synthetic": "1024,8000", "stdlib": True, "v1": True}  # synthetic vocabulary sizes
SMOKE = {"synthetic": "1024", "stdlib": False, "v1": False}


def corpus(stdlib: bool) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for folder in sorted(CORPUS.iterdir()):
        if folder.is_dir():
            texts[folder.name] = [t for f in sorted(folder.iterdir()) for t in _paragraphs(f)]
    if stdlib:
        import pydoc_data.topics

        lib = Path(sysconfig.get_paths()["stdlib"])
        texts["en prose (Python docs)"] = [
            text for topic in pydoc_data.topics.topics.values() for _, text in paragraphs(topic)
        ]
        texts["code (Python stdlib)"] = [t for name in STDLIB_CODE for t in _paragraphs(lib / name)]
    return texts


def _paragraphs(path: Path) -> list[str]:
    return [text for _, text in paragraphs(path.read_text(encoding="utf-8"))]


def tokenizer_folder(checkpoint: Path, out: Path, vocab_size: int) -> Path:
    out.mkdir(parents=True)
    write_tokenizer(checkpoint, out, vocab_size)
    model = {"type": "internlm2", "context_length": 64, "bos_token_id": 1, "eos_token_id": 2}
    (out / "genai_config.json").write_text(json.dumps({"model": {**model, "pad_token_id": 2}}))
    return out


def without_split(folder: Path, out: Path) -> Path:
    shutil.copytree(folder, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = NO_SPLIT
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    return out


def vocabularies(work: Path, synthetic: list[int], v1: bool = True) -> dict[str, Path]:
    folders = {}
    if v1 and FIXTURE.is_file():
        checkpoint = work / "v1-checkpoint"
        checkpoint.mkdir()
        shutil.copyfile(FIXTURE, checkpoint / "tokenizer.model")
        folders["InternLM v1"] = tokenizer_folder(checkpoint, work / "v1", 103168)
    elif v1:
        print(f"warning: {FIXTURE}: not found, only synthetic vocabularies", flush=True)
    for size in synthetic:
        checkpoint = work / f"synthetic-{size}-checkpoint"
        train_tokenizer(checkpoint, size, chat=True, seed=0)
        out = work / f"synthetic-{size}"
        folders[f"synthetic {size}"] = tokenizer_folder(checkpoint, out, size)
    return folders


def encoders(folder: Path, work: Path) -> dict[str, object]:
    og = genai()
    runtime = og.Tokenizer(str(folder))
    before = og.Tokenizer(str(without_split(folder, work / f"{folder.name}-no-split")))
    exact = exact_tokenizer(folder)
    as_written = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return {
        "og": lambda text: [int(i) for i in runtime.encode(text)],
        "og, no Split": lambda text: [int(i) for i in before.encode(text)],
        "exact": lambda text: exact.encode(text, add_special_tokens=False).ids,
        "tokenizers, file": lambda text: as_written.encode(text, add_special_tokens=False).ids,
    }


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    texts = corpus(stdlib=args.stdlib)
    with tempfile.TemporaryDirectory(prefix="tokenizer-agreement-") as tmp:
        work = Path(tmp)
        folders = vocabularies(work, [int(s) for s in args.synthetic.split(",") if s], args.v1)
        return rows_of(ctx, texts, folders, work)


def rows_of(ctx, texts: dict[str, list[str]], folders: dict[str, Path], work: Path) -> list[Row]:
    out = []

    def row(vocabulary: str, tool: str, metric: str, value: float, unit: str, **params) -> Row:
        return ctx.row(model=vocabulary, variant="tokenizer", tool=tool, metric=metric,
                       value=value, unit=unit, params=params)  # fmt: skip

    for vocabulary, folder in folders.items():
        reference = sentencepiece_encoder(folder)
        for name, encode in encoders(folder, work).items():
            for language, blocks in texts.items():
                start = time.perf_counter()
                result = agreement(name, encode, reference, list(enumerate(blocks)))
                seconds = time.perf_counter() - start
                agree = result.paragraphs - len(result.differing)
                tokens = result.tokens - result.differing_tokens
                counts = {"language": language, "paragraphs": result.paragraphs}
                counts["tokens"] = result.tokens
                out += [
                    row(
                        vocabulary,
                        name,
                        "paragraphs_agree",
                        agree / result.paragraphs,
                        "",
                        **counts,
                    ),
                    row(vocabulary, name, "tokens_agree", tokens / result.tokens, "", **counts),
                    row(vocabulary, name, "seconds", seconds, "s", **counts),
                ]
                print(f"{vocabulary} {language} {name}: {agree}/{result.paragraphs} paragraphs, "
                      f"{tokens}/{result.tokens} tokens agree", flush=True)  # fmt: skip
            whole = whole_pieces(folder, encode, reference)
            kept = (whole.pieces - len(whole.cut)) / whole.pieces
            out.append(row(vocabulary, name, "pieces_whole", kept, "", pieces=whole.pieces))
    return out

"""InternLM2's SentencePiece tokenizer as the `tokenizer.json` ONNX Runtime GenAI needs.

`tokenizer.model` is the source of truth. A `tokenizer.json` shipped with the checkpoint is not
used: those come from the hub's remote-code fast converter, whose decoder always strips a leading
space (wrong without a dummy prefix), and fine-tunes can carry re-appended special tokens in them.

How the `tokenizers` pipeline reproduces SentencePiece BPE exactly (tests/test_tokenizer.py):
- model: BPE over the proto's pieces with its byte fallback. The merges are every split of a
  normal piece into two normal pieces, ranked by the merged piece's score: SentencePiece's BPE
  repeatedly merges the adjacent pair whose concatenation is the best-scored piece.
- normalizer: the proto's normalizer_spec, in SentencePiece's order: precompiled character map
  (empty for InternLM2's "identity" rule), remove_extra_whitespaces, the dummy-prefix "▁" (off
  for InternLM2: llama.cpp#5184 turns the space prefix off for it), then " " -> "▁".
- pre-tokenizer: none in effect: SentencePiece runs BPE over the whole text. exact_tokenizer()
  drops the file's Split, which is for the runtime (see below) and only cuts text where no
  piece spans the cut, so `tokenizers` on the file as such agrees on all text measured too.
- atomic tokens: `added_tokens_decoder` (and `added_tokens.json`) override the proto's names, so
  InternLM2's `[UNUSED_TOKEN_145]` piece becomes `<|im_end|>`, matched in text as one id. The
  proto's control pieces stay special (they decode to nothing, as in SentencePiece) and its
  user-defined pieces become plain added tokens (SentencePiece matches those atomically too).
- decoder: "▁" -> " ", byte pieces -> UTF-8, and the dummy prefix stripped when there is one.

What onnxruntime-genai 0.18's own tokenizer (onnxruntime-extensions, operators/tokenizer/) does
with each tokenizer.json, measured on real Chinese and English Markdown and Python with the
published InternLM v1 vocabulary (benchmarks/tokenizer_agreement.py, tests/data/corpus):
- no pre-tokenizer in effect (a String Split): SpmTokenize cuts the text itself before BPE
  (bpe_kernels.cc: before " " or "\n" once a chunk holds over 10 symbols, anywhere after 100),
  through pieces such as ">\n", "',\n" and Chinese words; 25% of Chinese, 27% of English and
  82% of Python paragraphs got other ids than SentencePiece's.
- a Regex Split: each match is BPE'd on its own, with the same merges as `tokenizers`. OG_CHUNKS
  cuts only where no piece of InternLM's vocabularies spans the cut, and gives SentencePiece's
  ids on every paragraph of that corpus, of Python's docs and stdlib, and of 1 MB more InternLM
  and lmdeploy docs. It still cuts a run of over RUN characters that are neither letters nor
  digits, maybe inside a piece ("-" * 400).
- a Sequence of Splits is ignored by SpmTokenize (every character its own chunk); the Unigram
  classes (SentencePieceBackend, T5Tokenizer...) run Viterbi, not BPE; a byte-level vocab cannot
  express byte fallback for characters that share UTF-8 prefixes with pieces.
Decoding and special tokens are exact either way.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import sentencepiece
from google.protobuf.message import DecodeError
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from internlm2_graph.errors import InternLM2GraphError

try:
    from sentencepiece import sentencepiece_model_pb2
except ImportError as error:
    # sentencepiece 0.2.3's generated reader needs protobuf 7.36.1+ and does not declare it.
    raise InternLM2GraphError(
        f"sentencepiece cannot read tokenizer.model files with this protobuf ({error}): "
        'pip install "protobuf>=7.36.1", or "sentencepiece<0.2.3" to keep this protobuf'
    ) from error

ModelProto = sentencepiece_model_pb2.ModelProto
Piece = ModelProto.SentencePiece
TURN_END = "<|im_end|>"
TOKEN_FLAGS = ("lstrip", "normalized", "rstrip", "single_word", "special")

# How og.Tokenizer (onnxruntime-extensions' SpmTokenize, operators/tokenizer/bpe_kernels.cc) is
# made to cut text only between pieces. With a Split regex it runs BPE on each match separately;
# SentencePiece runs BPE on the whole text, so a cut is harmless exactly where no piece of the
# vocabulary spans it. In InternLM's vocabularies (the published v1 one: 103168 pieces) no piece
# goes on past the end of a run of letters or of digits, or into a CJK ideograph from another
# character; other boundaries (">\n", "._", "▁▁▁▁return", "）。", "▁の") some piece spans. So a
# chunk is a run of letters, or of digits, or a run of other characters with the letters after
# it. The runtime tries its built-in matchers (PreTokenizerWithRegEx::Compile in bpe_utils.hpp,
# found by exact substring) before the rest of the pattern, which goes to std::regex over UTF-8
# bytes: no \p{..} there, and \u00XX stands for one byte. std::regex searches from where the
# last chunk ended; without "^" it could match further on, and the runtime would drop what it
# skipped (MatchWithSTLRegEx). An unbounded run recurses once per byte (a stack overflow near
# 25 KB), and a bound much over 1000 exceeds std::regex's NFA state limit: hence RUN.
_LETTERS = r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"  # built in: one other character, then letters
_NUMBERS = r" ?\p{L}+| ?\p{N}+"  # built in; after _LETTERS only its digit half ever matches
_CONT = r"[\u0080-\u00bf]"  # a UTF-8 continuation byte
_OTHER = "|".join(
    [
        r"[\u0000-\u002f\u003a-\u0040\u005b-\u0060\u007b-\u007f]",  # ASCII, not letter or digit
        rf"[\u00c2-\u00df]{_CONT}",  # two-byte characters, letters too ("▁ال" stays whole)
        # U+2000-2FFF, U+3000-3FFF, U+F000-FFFF: punctuation ("▁", "。", "，"), symbols, kana
        # ("▁の"), but not the ideographs, which start at U+4E00 (lead bytes E4-E9).
        rf"[\u00e2\u00e3\u00ef]{_CONT}{{2}}",
        rf"[\u00f0-\u00f4]{_CONT}{{3}}",  # emoji and other four-byte characters
    ]
)
# Latin letters after the run: ASCII, two-byte (from U+00C0: "é", "ñ") and Vietnamese (U+1Exx).
_WORD = rf"[A-Za-z]|[\u00c3-\u00df]{_CONT}|\u00e1[\u00b8-\u00bb]{_CONT}"
_UTF8_LEADS = ((r"\u00c0-\u00df", 1), (r"\u00e0-\u00ef", 2), (r"\u00f0-\u00f7", 3))
_ANY = "|".join([r"[\u0000-\u007f]", *(rf"[{lead}]{_CONT}{{{n}}}" for lead, n in _UTF8_LEADS)])
# The same file must cut as safely where `tokenizers` reads it (Oniguruma, on characters, after
# the normalizer turned " " into "▁"): there "^" is a line start and \u00XX a Latin-1 character.
# A class that excludes every Latin-1 character can never match one byte, so std::regex never
# takes the parts below built on _LATIN1 (two ranges: one would end at -1 as a signed char).
_LATIN1 = r"\u0000-\u007f\u0080-\u00ff"
_WIDE_OTHER = "|".join(
    [
        rf"[^{_LATIN1}[:alnum:]]",  # Oniguruma only: "▁", "。", emoji...
        # U+0080-00BF, "«", "©", "·" for Oniguruma; for std::regex a continuation byte, which
        # never starts a character, so never matches where a run can go on.
        _CONT,
    ]
)
_WIDE_LETTERS = rf"[^{_LATIN1}\W]+"  # Oniguruma only: letters past U+00FF, "中文"
# Longest run in one chunk: past it, a cut can split a piece. Markdown table rules run to a few
# hundred characters; 384 is a multiple of the longest "▁" piece (128) and is still fast.
RUN = 384
OG_CHUNKS = "|".join(
    [
        _LETTERS,
        _NUMBERS,
        rf"^(?:{_OTHER}|{_WIDE_OTHER}){{1,{RUN}}}(?:{_WIDE_LETTERS}|(?:{_WORD}){{0,{RUN}}})",
        rf"^(?:{_ANY})",  # anything else, one character at a time
        # Oniguruma only (the line above always matches for std::regex): such a chunk anywhere.
        r"[^[:alnum:]]+[[:alpha:]]*",
    ]
)


class TokenizerError(InternLM2GraphError):
    """The checkpoint's tokenizer files are missing, broken or disagree with the model."""


@dataclass(frozen=True)
class TokenizerInfo:
    """Token ids of the converted tokenizer that the runtime config needs."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    im_end_token_id: int | None
    special_tokens: Mapping[str, int]
    chat_template: str | None

    @property
    def turn_end_ids(self) -> tuple[int, ...]:
        """Ids that end a chat turn: generation must stop on them as well as on eos."""
        return () if self.im_end_token_id is None else (self.im_end_token_id,)


@dataclass(frozen=True)
class PreparedTokenizer:
    """A checkpoint's tokenizer, read and checked, ready to write: nothing is written until
    `write`, so a build can check it before it creates its output folder."""

    source: Path
    tokenizer: Tokenizer
    config: dict
    special_map: dict
    info: TokenizerInfo
    proto: ModelProto  # tokenizer.model as read and checked

    def encode(self, text: str) -> list[int]:
        """SentencePiece's own ids of plain text, without <s> (added tokens are not matched
        whole): what calibration text becomes, from the model already read and checked."""
        processor = sentencepiece.SentencePieceProcessor(model_proto=self.proto.SerializeToString())
        return processor.encode(text)

    def write(self, out_dir: Path) -> TokenizerInfo:
        """tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model."""
        out_dir = Path(out_dir)
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        _write_json(out_dir / "tokenizer_config.json", self.config)
        _write_json(out_dir / "special_tokens_map.json", self.special_map)
        shutil.copyfile(self.source / "tokenizer.model", out_dir / "tokenizer.model")
        return self.info


def prepare_tokenizer(checkpoint_dir: Path, vocab_size: int) -> PreparedTokenizer:
    """Read and check the checkpoint's tokenizer files; `vocab_size` is the number of embedding
    rows, and every token id must be below it."""
    checkpoint_dir = Path(checkpoint_dir)
    proto = load_model(checkpoint_dir / "tokenizer.model")
    config = _read_json(checkpoint_dir / "tokenizer_config.json")
    added = added_tokens(config, _read_json(checkpoint_dir / "added_tokens.json"))
    atomic = atomic_tokens(proto, added)
    names = token_names(proto, atomic)
    check_ids(names, vocab_size, checkpoint_dir)
    tokenizer = build_tokenizer(proto, atomic, config)
    # onnxruntime-genai reads tokenizer_class, the special tokens and chat_template from here;
    # added_tokens_decoder is rewritten to list exactly the added tokens of tokenizer.json.
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        **config,
        "added_tokens_decoder": {str(i): entry for i, entry in sorted(atomic.items())},
    }
    special_map = _read_json(checkpoint_dir / "special_tokens_map.json") or _special_map(config)
    info = tokenizer_info(proto, names, atomic, config)
    return PreparedTokenizer(checkpoint_dir, tokenizer, config, special_map, info, proto)


def write_tokenizer(checkpoint_dir: Path, out_dir: Path, vocab_size: int) -> TokenizerInfo:
    """Check the checkpoint's tokenizer and write the runtime's files into `out_dir`."""
    return prepare_tokenizer(checkpoint_dir, vocab_size).write(out_dir)


def load_model(path: Path) -> ModelProto:
    """The SentencePiece model proto, or a TokenizerError saying how to get a usable one."""
    if not path.is_file():
        raise TokenizerError(
            f"{path}: not found. InternLM2 checkpoints ship their SentencePiece tokenizer as "
            "tokenizer.model; copy it from the base model's hub repo (e.g. "
            "internlm/internlm2-chat-7b) into the checkpoint folder."
        )
    proto = ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as error:
        raise TokenizerError(
            f"{path}: not a SentencePiece model ({error}); the file is truncated or a Git LFS "
            "pointer. Download it again (git lfs pull, or from the hub)."
        ) from error
    if not proto.pieces:
        raise TokenizerError(f"{path}: a SentencePiece model without pieces; download it again.")
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise TokenizerError(f"{path}: a SentencePiece {kind} model, but InternLM2's is BPE.")
    return proto


def added_tokens(config: dict, added_json: dict) -> dict[int, dict]:
    """id -> token entry, from added_tokens.json (older transformers) and added_tokens_decoder."""
    # added_tokens.json only maps names to ids; in InternLM2 checkpoints they are chat controls.
    tokens = {int(i): _entry(name, special=True) for name, i in added_json.items()}
    for i, entry in config.get("added_tokens_decoder", {}).items():
        flags = {key: entry[key] for key in TOKEN_FLAGS if key in entry}
        tokens[int(i)] = _entry(entry["content"], **flags)
    return tokens


def atomic_tokens(proto: ModelProto, added: dict[int, dict]) -> dict[int, dict]:
    """Every token matched whole in text: the added ones, then the proto's own atomic pieces."""
    atomic = {}
    for i, piece in enumerate(proto.pieces):
        if piece.type in (Piece.CONTROL, Piece.UNKNOWN):
            atomic[i] = _entry(piece.piece, special=True)
        elif piece.type == Piece.USER_DEFINED:
            atomic[i] = _entry(piece.piece, special=False)
    return atomic | added


def token_names(proto: ModelProto, atomic: dict[int, dict]) -> dict[int, str]:
    """id -> token string: the proto's pieces, renamed or extended by the atomic tokens."""
    names = {i: piece.piece for i, piece in enumerate(proto.pieces)}
    names.update({i: entry["content"] for i, entry in atomic.items()})
    return names


def check_ids(names: dict[int, str], vocab_size: int, checkpoint_dir: Path) -> None:
    """Fail when a token has no embedding row, or when two ids share one token string."""
    outside = sorted(i for i in names if i >= vocab_size)
    if outside:
        listed = ", ".join(f"{i} {names[i]!r}" for i in outside[:8])
        more = f" and {len(outside) - 8} more" if len(outside) > 8 else ""
        raise TokenizerError(
            f"{checkpoint_dir}: the tokenizer has ids {listed}{more}, but the model's embedding "
            f"has {vocab_size} rows (config.json vocab_size), so those ids are out of range. A "
            "fine-tune probably appended special tokens again as new ids, although InternLM2 "
            "already has its chat tokens at the end of tokenizer.model (InternLM#715). Remove "
            "those ids from added_tokens.json and tokenizer_config.json's added_tokens_decoder "
            "(or copy both files from the base model); if the model really was trained with "
            "them, its embeddings and vocab_size must grow to match."
        )
    first: dict[str, int] = {}
    for i, name in sorted(names.items()):
        if name in first:
            raise TokenizerError(
                f"{checkpoint_dir}: token {name!r} has two ids, {first[name]} and {i} "
                "(tokenizer.model, added_tokens.json and tokenizer_config.json's "
                "added_tokens_decoder disagree); keep one of them."
            )
        first[name] = i


def build_tokenizer(proto: ModelProto, atomic: dict[int, dict], config: dict) -> Tokenizer:
    """A `tokenizers` pipeline that encodes and decodes like SentencePiece on `proto`."""
    vocab = {name: i for i, name in token_names(proto, atomic).items()}
    tokenizer = Tokenizer(
        BPE(
            vocab,
            bpe_merges(proto, set(atomic)),
            unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    spec = proto.normalizer_spec
    tokenizer.normalizer = normalizer(spec)
    tokenizer.pre_tokenizer = pre_tokenizer(spec.add_dummy_prefix)
    # SentencePiece's decoder drops a leading space whenever encoding cannot have made one.
    tokenizer.decoder = decoder(spec.add_dummy_prefix or spec.remove_extra_whitespaces)
    tokenizer.post_processor = post_processor(config, vocab)
    tokenizer.add_tokens([AddedToken(**entry) for _, entry in sorted(atomic.items())])
    return tokenizer


def bpe_merges(proto: ModelProto, atomic: set[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best-scored result first."""
    normal = {
        piece.piece: i
        for i, piece in enumerate(proto.pieces)
        if piece.type == Piece.NORMAL and i not in atomic
    }
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-proto.pieces[i].score, i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def normalizer(spec: sentencepiece_model_pb2.NormalizerSpec) -> normalizers.Normalizer:
    """SentencePiece's normalization steps, in its order."""
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # Only U+0020 counts here (normalizers.Strip would also trim newlines and tabs).
        steps.append(normalizers.Replace(Regex(r"\A +| +\z"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def pre_tokenizer(add_dummy_prefix: bool) -> pre_tokenizers.PreTokenizer | None:
    """The Split that makes og.Tokenizer cut text only where no piece spans the cut.

    Written for onnxruntime-genai's tokenizer, which BPEs each match on its own (see OG_CHUNKS);
    `tokenizers` cuts at safe places with it too. exact_tokenizer() drops it all the same: BPE
    over the whole text is SentencePiece's by construction, whatever the vocabulary. A model with
    a dummy prefix (not InternLM2) keeps no pre-tokenizer: og then adds the prefix itself.
    """
    if add_dummy_prefix:
        return None
    return pre_tokenizers.Split(Regex(OG_CHUNKS), behavior="isolated")


def decoder(strip_leading_space: bool) -> decoders.Decoder:
    """Pieces back to text: "▁" to spaces, byte pieces to UTF-8, maybe one leading space off."""
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_leading_space:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def post_processor(config: dict, vocab: dict[str, int]) -> processors.TemplateProcessing:
    """bos (and eos) around each encoding, as InternLM2Tokenizer's add_bos/eos_token say."""
    single, special = "$A", []
    if config.get("add_bos_token", True):
        bos = _content(config.get("bos_token", "<s>"))
        single = f"{bos} {single}"
        special.append((bos, vocab[bos]))
    if config.get("add_eos_token", False):
        eos = _content(config.get("eos_token", "</s>"))
        single = f"{single} {eos}"
        special.append((eos, vocab[eos]))
    pair = f"{single} {single.replace('$A', '$B')}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_info(
    proto: ModelProto, names: dict[int, str], atomic: dict[int, dict], config: dict
) -> TokenizerInfo:
    """The ids, in the converted vocab, of the tokens tokenizer_config.json names."""
    ids = {name: i for i, name in names.items()}
    spec = proto.trainer_spec

    def token_id(key: str, default: str | None) -> int | None:
        return ids.get(_content(config.get(key, default)))

    return TokenizerInfo(
        bos_token_id=token_id("bos_token", spec.bos_piece),
        eos_token_id=token_id("eos_token", spec.eos_piece),
        pad_token_id=token_id("pad_token", None),
        unk_token_id=token_id("unk_token", spec.unk_piece),
        im_end_token_id=ids.get(TURN_END),
        special_tokens=MappingProxyType(
            {entry["content"]: i for i, entry in sorted(atomic.items()) if entry["special"]}
        ),
        chat_template=config.get("chat_template"),
    )


def _entry(content: str, **flags: bool) -> dict:
    """A token as added_tokens_decoder spells it, unset flags false."""
    return {"content": content, **{key: bool(flags.get(key, False)) for key in TOKEN_FLAGS}}


def _special_map(config: dict) -> dict:
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    return {key: config[key] for key in keys if config.get(key) is not None}


def _content(token: str | dict | None) -> str | None:
    """A token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path}: not valid JSON ({error}); download it again.") from error


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def exact_tokenizer(model_dir: str | Path) -> Tokenizer:
    """A built folder's tokenizer.json under the `tokenizers` library: SentencePiece's ids
    exactly, where og.Tokenizer can still differ on rare text (README, "Tokenization"). Hand
    its ids to og's Generator. A rendered chat prompt already starts with <s>: encode it with
    add_special_tokens=False."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"{path}: not found; pass the --output folder of an internlm2-graph build"
        )
    tokenizer = Tokenizer.from_file(str(path))
    # The Split is there for og's tokenizer; BPE over the whole text is SentencePiece's for any
    # vocabulary, not only where no piece spans the Split's cuts.
    tokenizer.pre_tokenizer = None
    return tokenizer


def sentencepiece_encoder(model_dir: str | Path) -> Callable[[str], list[int]]:
    """The ids to compare others with: SentencePiece on the folder's tokenizer.model, with the
    folder's added tokens (<s>, <|im_start|>...) matched whole first, as in a chat prompt."""
    folder = Path(model_dir)
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise TokenizerError(f"{model}: not found; rebuild the folder with internlm2-graph")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    added = {t["content"]: t["id"] for t in _read_json(folder / "tokenizer.json")["added_tokens"]}
    # Longest first, so that at one position the longest added token wins, as in `tokenizers`;
    # "(?!)" never matches, for a file without added tokens.
    longest_first = sorted(added, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in longest_first) or "(?!)")

    def encode(text: str) -> list[int]:
        ids, start = [], 0
        for match in pattern.finditer(text):
            ids += processor.encode(text[start : match.start()])
            ids.append(added[match.group()])
            start = match.end()
        return ids + processor.encode(text[start:])

    return encode

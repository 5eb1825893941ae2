"""A real, small SentencePiece BPE tokenizer laid out like InternLM2's.

Trained at call time (well under a second) on a generated multilingual corpus, so tests exercise
the code paths of the published `tokenizer.model`: byte fallback, digits split one by one,
whitespace runs, CJK, and InternLM2's chat-token quirk. The last six pieces are named
`[UNUSED_TOKEN_141]`..`[UNUSED_TOKEN_146]` in the model itself; only `tokenizer_config.json`'s
`added_tokens_decoder` calls them `<|plugin|>`..`<|im_start|>` (ids 92538..92543 of 92544 in the
real checkpoints). Converters that read names from `tokenizer.model` alone get chat wrong.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

# Chat name of each of the six trailing pieces, in id order (as in the published chat models).
CHAT_TOKENS = (
    ("[UNUSED_TOKEN_141]", "<|plugin|>"),
    ("[UNUSED_TOKEN_142]", "<|interpreter|>"),
    ("[UNUSED_TOKEN_143]", "<|action_end|>"),
    ("[UNUSED_TOKEN_144]", "<|action_start|>"),
    ("[UNUSED_TOKEN_145]", "<|im_end|>"),
    ("[UNUSED_TOKEN_146]", "<|im_start|>"),
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
META_TOKENS = ("<unk>", "<s>", "</s>")
USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED

# As far as the published tokenizer shows: BPE with byte fallback, no Unicode normalization,
# whitespace kept as typed and no dummy-prefix space (llama.cpp#5184 turns the space prefix off
# for InternLM2). Split digits and whitespace-only pieces (code indentation) are assumptions.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    required_chars="\n\t",
    max_sentencepiece_length=16,
    num_threads=1,
    minloglevel=2,
)

# fmt: off
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "one", "all", "we", "can", "their", "has",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "model", "token",
    "tokenizer", "graph", "layer", "attention", "weight", "runtime", "export", "convert",
    "language", "chat", "assistant", "user", "system", "message", "hello", "world", "python",
    "number", "time", "year", "people", "between", "through", "during", "before", "after",
    "under", "again", "further", "then", "once", "here", "where", "why", "how", "about",
    "against", "each", "few", "most", "other", "some", "such", "only", "own", "same", "than",
    "too", "very", "just", "should", "now",
)
# fmt: on
_CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使"
    "点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明"
    "看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料"
    "模型分词器语言中文测试"
)
_KANA = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
)
_HANGUL = "가나다라마바사아자차카타파하는을를이에서의고한국어"
_EMOJI = "😀😂🙂🚀🎉👍❤✨🔥🌍"
_PUNCT = ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"
_CODE = (
    "def {w}({a}, {b}):\n    return {a} + {b} * {n}\n",
    "for i in range({n}):\n\tif i % 2 == 0:\n\t\tprint(i, '{w}')\n",
    "const {w} = ({a}) => {{\n  return {a}.map(x => x * {n});\n}};\n",
    "class {W}:\n    def __init__(self):\n        self.{w} = [{n}, {m}]\n",
    '#include <stdio.h>\nint main() {{ printf("%d\\n", {n}); return 0; }}\n',
    '{{"{w}": {n}, "{a}": [{m}, "{b}"], "ok": true}}\n',
)


def train_tokenizer(
    out_dir: Path, vocab_size: int = 1024, chat: bool = True, seed: int = 0
) -> None:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `vocab_size` counts every piece (the embedding rows it is meant for). With `chat=False` the six
    trailing pieces still exist, as in the base models, but are not named in the config.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = _train_model(vocab_size - len(CHAT_TOKENS), seed)
    for piece, _ in CHAT_TOKENS:
        proto.pieces.add(piece=piece, score=0.0, type=USER_DEFINED)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    added = _added_tokens(vocab_size, chat)
    config = _tokenizer_config(added, chat)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map(chat))


def corpus(seed: int, lines: int = 6000) -> Iterator[str]:
    """Deterministic mixed text: prose, numbers, code with indentation, CJK, emoji, blank runs."""
    rng = random.Random(seed)
    makers = (_prose, _numbers, _code, _cjk, _mixed)
    for _ in range(lines):
        yield rng.choice(makers)(rng)


def _train_model(pieces: int, seed: int) -> sentencepiece_model_pb2.ModelProto:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(seed), model_writer=buffer, vocab_size=pieces, **TRAINER_OPTIONS
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def _prose(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(4, 16))
    words[0] = words[0].capitalize()
    spaces = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
    return spaces.join(words) + rng.choice(".!?,;:") + rng.choice(["", " ", "\n", "\n\n"])


def _numbers(rng: random.Random) -> str:
    n = rng.randint(0, 10 ** rng.randint(1, 9))
    return rng.choice(
        [
            f"{n}",
            f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
            f"{n / 7:.4f} + {rng.randint(0, 99)}% = {n}",
            f"+86 {rng.randint(100, 999)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        ]
    )


def _code(rng: random.Random) -> str:
    names = rng.choices(_WORDS, k=3)
    return rng.choice(_CODE).format(
        w=names[0],
        a=names[1],
        b=names[2],
        W=names[0].capitalize(),
        n=rng.randint(0, 999),
        m=rng.randint(0, 99),
    )


def _cjk(rng: random.Random) -> str:
    alphabet = rng.choice([_CJK, _CJK, _KANA, _HANGUL])
    text = "".join(rng.choices(alphabet, k=rng.randint(4, 24)))
    return text + rng.choice(["。", "，", "！", "？", "、", ""])


def _mixed(rng: random.Random) -> str:
    parts = [
        rng.choice(_WORDS),
        "".join(rng.choices(_CJK, k=rng.randint(1, 4))),
        rng.choice(_EMOJI),
        rng.choice(_PUNCT),
        str(rng.randint(0, 9999)),
        " " * rng.randint(2, 8),
        "\n" * rng.randint(1, 3),
    ]
    rng.shuffle(parts)
    return "".join(parts)


def _added_tokens(vocab_size: int, chat: bool) -> dict[str, dict]:
    """added_tokens_decoder as the hub's configs write it: id (a string) -> token entry."""
    names = dict(enumerate(META_TOKENS))
    if chat:
        first = vocab_size - len(CHAT_TOKENS)
        names.update({first + i: name for i, (_, name) in enumerate(CHAT_TOKENS)})
    return {str(i): _token_entry(name) for i, name in names.items()}


def _token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config(added_tokens: dict[str, dict], chat: bool) -> dict:
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens,
        "additional_special_tokens": _chat_names() if chat else [],
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    return config


def _special_tokens_map(chat: bool) -> dict:
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    if chat:
        special["additional_special_tokens"] = _chat_names()
    return special


def _chat_names() -> list[str]:
    # The published configs list them from <|im_start|> down to <|plugin|>.
    return [name for _, name in reversed(CHAT_TOKENS)]


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""The converted tokenizer encodes and decodes like SentencePiece, in `tokenizers` and the runtime.

SentencePiece on the checkpoint's tokenizer.model is the oracle. exact_tokenizer (`tokenizers` on
the written tokenizer.json) must match it id for id on any text; onnxruntime-genai's tokenizer
matches it on the texts below and on random text, and always decodes exactly. Real text with a
real vocabulary is in test_tokenizer_agreement.py. Special tokens, the chat template and the
error messages are checked too.
"""

import io
import json
from pathlib import Path

import onnxruntime_genai as og
import pytest
import sentencepiece as spm
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer

from internlm2_graph.synthetic.tokenizer import (
    CHAT_TEMPLATE,
    CHAT_TOKENS,
    TRAINER_OPTIONS,
    corpus,
    train_tokenizer,
)
from internlm2_graph.tokenizer import (
    OG_CHUNKS,
    TokenizerError,
    exact_tokenizer,
    write_tokenizer,
)

VOCAB = 1024
OLD_SENTENCEPIECE = tuple(int(n) for n in spm.__version__.split(".")[:3]) < (0, 2, 3)
IM_END, IM_START = VOCAB - 2, VOCAB - 1
# Each example costs a millisecond or so: run many more than the profile's default.
MANY = settings(max_examples=50 * settings.default.max_examples)

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    " ",
    "line one\nline two\n\nline four\n",
    "\ttab\tseparated\t",
    "mixed \t \n whitespace \r\n end",
    "0123456789",
    "3.14159 + 2,718 = 5.86 (v1.2.3)",
    "中文测试模型，分词器。",
    "日本語のテキストです",
    "한국어 문장",
    "emoji 😀🚀🦄 and rare bytes \x01\x7f ü é ñ",
    "Ωmega ∑ 𝔘nicode ﬁ ①",
    "def f(x):\n    return x * 2\n",
    "mixed 中文 English 123 😀\n  indented",
]
# Texts where onnxruntime-genai cut through a SentencePiece piece when tokenizer.json had no
# regex Split (it cut before "\n" once a chunk held 10 symbols, and every 100): see OG_CHUNKS.
RUNTIME_CUTS = [
    "for i in range(3):\n\tprint(i)\n",
    "def __init__(self):\n        self.x = 1\n",
    " " * 240,
    "\n" * 300,
]
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi 你好"},
]
PROMPT = (
    "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nHi 你好<|im_end|>\n<|im_start|>assistant\n"
)

# Written out in text, SentencePiece spells the special tokens out where `tokenizers` and the
# runtime match their ids, and matches the [UNUSED_TOKEN_14x] pieces that the chat names replace.
ATOMIC = ("<unk>", "<s>", "</s>", *(token for pair in CHAT_TOKENS for token in pair))
# Any text, biased towards what tokenizers get wrong: spaces, newlines, digits, CJK, emoji,
# control characters and bytes SentencePiece has no piece for. No NUL: the runtime's C API takes
# NUL-terminated strings (test_rare_characters_fall_back_to_bytes covers it for `tokenizers`).
any_text = st.text(
    st.one_of(
        st.sampled_from(" \n\t\r▁0123456789.,:;()"),
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x4E80),
        st.characters(codec="utf-8", exclude_characters="\x00"),
    ),
    max_size=80,
).filter(lambda text: not any(token in text for token in ATOMIC))


def make_og_tokenizer(folder: Path, eos: list[int]) -> og.Tokenizer:
    """og.Tokenizer reads genai_config.json first; a tokenizer needs no model, so none is made."""
    model = {"type": "internlm2", "context_length": 64, "bos_token_id": 1, "eos_token_id": eos}
    (folder / "genai_config.json").write_text(json.dumps({"model": {**model, "pad_token_id": 2}}))
    return og.Tokenizer(str(folder))


def train_variant(folder: Path, **overrides) -> Path:
    """A tokenizer.model trained with other SentencePiece settings, and no other file."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    options = {**TRAINER_OPTIONS, **overrides}
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(0), model_writer=model, vocab_size=VOCAB, **options
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    train_tokenizer(folder, VOCAB, chat=True, seed=0)
    return folder


@pytest.fixture(scope="session")
def chat(chat_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-out")
    info = write_tokenizer(chat_checkpoint, out, VOCAB)
    return out, info


@pytest.fixture(scope="session")
def sp(chat_checkpoint) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(chat_checkpoint / "tokenizer.model"))


@pytest.fixture(scope="session")
def hf(chat) -> Tokenizer:
    return exact_tokenizer(chat[0])


@pytest.fixture(scope="session")
def as_written(chat) -> Tokenizer:
    """`tokenizers` on the file as such, Split and all (as transformers would read it)."""
    return Tokenizer.from_file(str(chat[0] / "tokenizer.json"))


@pytest.fixture(scope="session")
def og_tokenizer(chat) -> og.Tokenizer:
    out, info = chat
    return make_og_tokenizer(out, [info.eos_token_id, *info.turn_end_ids])


def og_encode(tokenizer: og.Tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text)]


# --- the synthetic tokenizer looks like InternLM2's ---------------------------------------------


def test_synthetic_tokenizer_has_internlm2_layout(chat_checkpoint, sp):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((chat_checkpoint / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == sp.vocab_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix
    # The quirk: the model itself only knows the six chat tokens as [UNUSED_TOKEN_14x].
    tail = proto.pieces[-len(CHAT_TOKENS) :]
    assert [p.piece for p in tail] == [piece for piece, _ in CHAT_TOKENS]
    assert {p.type for p in tail} == {sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED}
    config = json.loads((chat_checkpoint / "tokenizer_config.json").read_text())
    named = {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()}
    assert named[IM_END] == "<|im_end|>" and named[IM_START] == "<|im_start|>"
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert config["chat_template"] == CHAT_TEMPLATE


def test_base_tokenizer_keeps_the_pieces_but_names_no_chat_tokens(tmp_path):
    train_tokenizer(tmp_path, VOCAB, chat=False, seed=0)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    names = {e["content"] for e in config["added_tokens_decoder"].values()}
    assert names == {"<unk>", "<s>", "</s>"}
    assert "chat_template" not in config
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.id_to_piece(IM_END) == "[UNUSED_TOKEN_145]"


def test_training_is_deterministic(chat_checkpoint, tmp_path):
    train_tokenizer(tmp_path / "same", VOCAB, chat=True, seed=0)
    train_tokenizer(tmp_path / "other", VOCAB, chat=True, seed=1)
    model = (chat_checkpoint / "tokenizer.model").read_bytes()
    assert (tmp_path / "same" / "tokenizer.model").read_bytes() == model
    assert (tmp_path / "other" / "tokenizer.model").read_bytes() != model


# --- what write_tokenizer writes and returns ----------------------------------------------------


def test_info_takes_chat_tokens_from_added_tokens_decoder(chat):
    _, info = chat
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (1, 2, 2)
    assert info.unk_token_id == 0
    assert info.im_end_token_id == IM_END
    assert info.turn_end_ids == (IM_END,)
    assert info.special_tokens["<|im_start|>"] == IM_START
    assert "[UNUSED_TOKEN_145]" not in info.special_tokens
    assert info.chat_template == CHAT_TEMPLATE


def test_written_files(chat_checkpoint, chat):
    out, _ = chat
    model = (chat_checkpoint / "tokenizer.model").read_bytes()
    assert (out / "tokenizer.model").read_bytes() == model
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert config["added_tokens_decoder"][str(IM_END)]["content"] == "<|im_end|>"
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "</s>"


def test_base_model_has_no_turn_end(tmp_path):
    train_tokenizer(tmp_path / "ckpt", VOCAB, chat=False, seed=0)
    (tmp_path / "out").mkdir()
    info = write_tokenizer(tmp_path / "ckpt", tmp_path / "out", VOCAB)
    assert info.im_end_token_id is None and info.turn_end_ids == ()
    assert info.chat_template is None
    # SentencePiece matches user-defined pieces whole; so does the converted tokenizer.
    hf = exact_tokenizer(tmp_path / "out")
    assert hf.encode("[UNUSED_TOKEN_145]", add_special_tokens=False).ids == [IM_END]


def test_embedding_may_have_more_rows_than_the_tokenizer(chat_checkpoint, tmp_path):
    info = write_tokenizer(chat_checkpoint, tmp_path, 92544)
    assert info.im_end_token_id == IM_END


def test_a_shipped_tokenizer_json_is_regenerated(chat_checkpoint, chat, tmp_path):
    checkpoint = copy_checkpoint(chat_checkpoint, tmp_path / "ckpt")
    (checkpoint / "tokenizer.json").write_text('{"stale": true}')
    (tmp_path / "out").mkdir()
    write_tokenizer(checkpoint, tmp_path / "out", VOCAB)
    written = (tmp_path / "out" / "tokenizer.json").read_text()
    assert written == (chat[0] / "tokenizer.json").read_text()


# --- encoding and decoding match SentencePiece --------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + RUNTIME_CUTS)
def test_tokenizers_encodes_like_sentencepiece(text, sp, hf, as_written):
    expected = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == expected
    assert as_written.encode(text, add_special_tokens=False).ids == expected
    # InternLM2Tokenizer adds bos (add_bos_token) but not eos.
    assert hf.encode(text).ids == [1, *expected]


@pytest.mark.parametrize("text", TEXTS + RUNTIME_CUTS)
def test_runtime_encodes_like_sentencepiece(text, sp, og_tokenizer):
    # The runtime adds no bos: its chat template writes one.
    assert og_encode(og_tokenizer, text) == sp.encode(text)


@pytest.mark.parametrize("text", TEXTS + RUNTIME_CUTS)
def test_decodes_like_sentencepiece(text, sp, hf, og_tokenizer):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert hf.decode(ids) == text
    assert og_tokenizer.decode(ids) == text
    stream = og_tokenizer.create_stream()
    assert "".join(stream.decode(i) for i in ids) == text


def test_rare_characters_fall_back_to_bytes(sp, hf):
    ids = hf.encode("🦄\x00", add_special_tokens=False).ids
    assert ids == sp.encode("🦄\x00")
    assert [sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x84>", "<0x00>"]
    assert hf.decode(ids) == "🦄\x00"


@MANY
@given(text=any_text)
@example(text="▁ ▁x▁")
@example(text="中文" * 60)
def test_tokenizers_matches_sentencepiece_on_any_text(text, sp, hf, as_written, og_tokenizer):
    ids = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert as_written.encode(text, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == sp.decode(ids)
    assert og_tokenizer.decode(ids) == sp.decode(ids)
    assert og_tokenizer.decode(og_encode(og_tokenizer, text)) == sp.decode(ids)


@MANY
@given(text=any_text)
@example(text="x" * 500 + "-" * 500)  # runs longer than OG_CHUNKS' RUN
@example(text="._name __init__(self):\n    ")
def test_runtime_matches_sentencepiece_on_any_text(text, sp, og_tokenizer):
    assert og_encode(og_tokenizer, text) == sp.encode(text)


def test_exact_tokenizer_is_the_file_without_the_runtimes_split(chat, hf):
    """BPE over the whole text is exact for any vocabulary, not only where no piece spans a cut."""
    written = json.loads((chat[0] / "tokenizer.json").read_text())
    assert written["pre_tokenizer"]["pattern"]["Regex"] == OG_CHUNKS
    assert json.loads(hf.to_str()) == {**written, "pre_tokenizer": None}


# --- special tokens and the chat template -------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CHAT_TOKENS)))
def test_each_chat_token_is_one_id(index, hf, og_tokenizer):
    name, token_id = CHAT_TOKENS[index][1], VOCAB - len(CHAT_TOKENS) + index
    assert hf.encode(name, add_special_tokens=False).ids == [token_id]
    assert og_encode(og_tokenizer, name) == [token_id]
    assert hf.decode([token_id], skip_special_tokens=False) == name


@pytest.mark.parametrize("name, token_id", [("<unk>", 0), ("<s>", 1), ("</s>", 2)])
def test_meta_tokens_are_one_id(name, token_id, hf, og_tokenizer):
    assert hf.encode(name, add_special_tokens=False).ids == [token_id]
    assert og_encode(og_tokenizer, name) == [token_id]


def test_special_tokens_decode_to_nothing(sp, hf, og_tokenizer):
    ids = [1, IM_START, *sp.encode("user\nhi"), IM_END, 2]
    assert hf.decode(ids) == og_tokenizer.decode(ids) == "user\nhi"


def test_runtime_renders_the_chat_template(og_tokenizer):
    rendered = og_tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert rendered == PROMPT


def test_chat_prompt_tokenizes_with_one_bos_and_single_chat_ids(sp, hf, og_tokenizer):
    def turn(role: str, content: str) -> list[int]:
        return [IM_START, *sp.encode(f"{role}\n{content}"), IM_END, *sp.encode("\n")]

    expected = [
        1,
        *turn("system", "You are helpful."),
        *turn("user", "Hi 你好"),
        IM_START,
        *sp.encode("assistant\n"),
    ]
    assert og_encode(og_tokenizer, PROMPT) == expected
    assert hf.encode(PROMPT, add_special_tokens=False).ids == expected


# --- other SentencePiece settings (not InternLM2's) still convert exactly -----------------------


VARIANTS = {
    "dummy prefix": dict(add_dummy_prefix=True),
    "nfkc, dummy prefix, no extra spaces": dict(
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True
    ),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_other_normalizer_settings_convert_exactly(overrides, tmp_path):
    if "normalization_rule_name" in overrides and OLD_SENTENCEPIECE:
        pytest.skip("SentencePiece < 0.2.3's BPE trainer aborts the process on this corpus")
    checkpoint = train_variant(tmp_path / "ckpt", **overrides)
    (tmp_path / "out").mkdir()
    info = write_tokenizer(checkpoint, tmp_path / "out", VOCAB)
    assert (info.bos_token_id, info.eos_token_id, info.im_end_token_id) == (1, 2, None)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    hf = exact_tokenizer(tmp_path / "out")
    for text in [*TEXTS, *corpus(7, 300)]:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids) == sp.decode(ids), text


# --- errors -------------------------------------------------------------------------------------


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not found.*copy it"):
        write_tokenizer(tmp_path, tmp_path, VOCAB)


def test_corrupt_tokenizer_model(chat_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(chat_checkpoint, tmp_path / "ckpt")
    lfs_pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1477754\n"
    (checkpoint / "tokenizer.model").write_text(lfs_pointer)
    with pytest.raises(TokenizerError, match="not a SentencePiece model.*Download it again"):
        write_tokenizer(checkpoint, tmp_path, VOCAB)


def test_error_is_a_value_error():
    assert issubclass(TokenizerError, ValueError)


def test_reappended_chat_tokens_are_out_of_range(chat_checkpoint, tmp_path):
    # What older transformers saved for fine-tunes: the chat tokens again, after the vocab.
    checkpoint = copy_checkpoint(chat_checkpoint, tmp_path / "ckpt")
    appended = {name: VOCAB + i for i, (_, name) in enumerate(CHAT_TOKENS)}
    (checkpoint / "added_tokens.json").write_text(json.dumps(appended))
    with pytest.raises(TokenizerError) as error:
        write_tokenizer(checkpoint, tmp_path, VOCAB)
    message = str(error.value)
    assert f"{VOCAB} '<|plugin|>'" in message and f"{VOCAB + 5} '<|im_start|>'" in message
    assert f"embedding has {VOCAB} rows" in message
    assert "added_tokens.json" in message


def test_more_pieces_than_embedding_rows(chat_checkpoint, tmp_path):
    with pytest.raises(TokenizerError, match=r"ids 1000 .* and 16 more.*has 1000 rows"):
        write_tokenizer(chat_checkpoint, tmp_path, 1000)


def test_one_token_with_two_ids(chat_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(chat_checkpoint, tmp_path / "ckpt")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["5"] = {"content": "<|im_end|>", "special": True}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=rf"'<\|im_end\|>' has two ids, 5 and {IM_END}"):
        write_tokenizer(checkpoint, tmp_path, VOCAB)

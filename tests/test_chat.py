"""Chat models: the runtime renders InternLM2's ChatML prompt, and a reply stops at <|im_end|>.

The tokenizer's own conversion is tested in test_tokenizer.py; here it is the built folder, as
`og.Model` and `og.Tokenizer` load it, and examples/chat.py run as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime_genai as og
import pytest
import sentencepiece as spm
from surgery import copy_checkpoint, edit_json, steer

from internlm2_graph import build
from internlm2_graph import chat as chat_module
from internlm2_graph.chat import Chat, search_options
from internlm2_graph.cli import main
from internlm2_graph.synthetic import make_config, write_checkpoint

CHAT_EXAMPLE = Path(__file__).parents[1] / "examples" / "chat.py"
# The messages examples/chat.py sends with its default text.
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about rivers."},
]
CHATML = (
    "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def special_ids(folder: Path) -> dict[str, int]:
    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {entry["content"]: int(i) for i, entry in decoder.items()}


def eos_token_ids(folder: Path) -> list[int]:
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


@pytest.fixture(scope="module")
def tokenizer(tiny_fp32) -> og.Tokenizer:
    return og.Tokenizer(og.Model(str(tiny_fp32)))


def steered_model(tiny_checkpoint: Path, folder: Path, default: str, cycle=()) -> Path:
    """A tiny chat model whose every reply is `default`, then `cycle` over and over."""
    checkpoint = copy_checkpoint(tiny_checkpoint, folder / "ckpt")
    ids = special_ids(checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    token = {name: ids.get(name, sp.piece_to_id(name)) for name in (default, *cycle)}
    transitions = {token[a]: token[b] for a, b in zip(cycle, [*cycle[1:], *cycle[:1]])}
    steer(checkpoint, token[default], transitions)
    build(checkpoint, folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def always_ends_turn(tiny_checkpoint, tmp_path_factory) -> Path:
    """Answers anything with <|im_end|> at once."""
    return steered_model(tiny_checkpoint, tmp_path_factory.mktemp("ends"), "<|im_end|>")


@pytest.fixture(scope="module")
def rockets(tiny_checkpoint, tmp_path_factory) -> Path:
    """Answers with 🚀 (UTF-8 F0 9F 9A 80) over and over, one byte-fallback token per byte."""
    rocket = [f"<0x{b:02X}>" for b in "🚀".encode()]
    return steered_model(tiny_checkpoint, tmp_path_factory.mktemp("rockets"), rocket[0], rocket)


@pytest.mark.model
def test_runtime_renders_the_internlm2_chatml_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert prompt == CHATML


@pytest.mark.model
def test_chat_prompt_tokens(tokenizer, tiny_fp32):
    ids = special_ids(tiny_fp32)
    tokens = list(tokenizer.encode(CHATML))
    assert tokens[:2] == [ids["<s>"], ids["<|im_start|>"]]  # one bos, not two
    assert tokens.count(ids["<|im_start|>"]) == 3 and tokens.count(ids["<|im_end|>"]) == 2
    assert tokens[-1] == tokenizer.encode("\n")[-1]


@pytest.mark.model
def test_eos_includes_the_end_of_turn(tiny_fp32):
    ids = special_ids(tiny_fp32)
    assert eos_token_ids(tiny_fp32) == [ids["</s>"], ids["<|im_end|>"]]


@pytest.mark.model
def test_end_of_turn_is_added_when_generation_config_omits_it(tiny_checkpoint, tmp_path):
    """Older chat fine-tunes ship generation_config.json with eos 2 only."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(folder / "generation_config.json", eos_token_id=2)
    build(folder, tmp_path / "out")
    assert eos_token_ids(tmp_path / "out") == [2, special_ids(folder)["<|im_end|>"]]


@pytest.mark.model
def test_base_model_stops_on_eos_alone(tmp_path):
    folder = write_checkpoint(tmp_path / "base", make_config("tiny"), chat=False)
    build(folder, tmp_path / "out")
    assert eos_token_ids(tmp_path / "out") == [2]


@pytest.mark.model
def test_reply_stops_at_the_end_of_its_turn(always_ends_turn):
    model = og.Model(str(always_ends_turn))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=128)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(CHATML))
    generator.generate_next_token()
    assert generator.get_next_tokens()[0] == special_ids(always_ends_turn)["<|im_end|>"]
    assert generator.is_done()


def run_chat_example(model: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(CHAT_EXAMPLE), str(model)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.model
def test_chat_example_streams_the_reply(rockets, tokenizer):
    """TokenizerStream must hold a character's first bytes back until it is complete."""
    prompt_tokens = len(tokenizer.encode(CHATML))
    reply_tokens = 256 - prompt_tokens  # examples/chat.py decodes up to max_length=256
    assert run_chat_example(rockets) == "🚀" * (reply_tokens // 4) + "\n"


@pytest.mark.model
def test_chat_example_prints_nothing_past_the_end_of_turn(always_ends_turn):
    assert run_chat_example(always_ends_turn) == "\n"


@pytest.mark.model
def test_chat_hands_og_sentencepieces_ids_with_whole_chat_tokens(always_ends_turn):
    """What examples/chat.py and `internlm2-graph chat` send: the rendered prompt (it starts
    with <s>) through the exact tokenizer with add_special_tokens=False. One <s>, each chat
    token one id, the text between them SentencePiece's ids."""
    ids = special_ids(always_ends_turn)
    sp = spm.SentencePieceProcessor(model_file=str(always_ends_turn / "tokenizer.model"))

    def turn(role: str, content: str) -> list[int]:
        text = sp.encode(f"{role}\n{content}")
        return [ids["<|im_start|>"], *text, ids["<|im_end|>"], *sp.encode("\n")]

    chat = Chat(always_ends_turn, system="You are a helpful assistant.")
    assert chat.reply("Write a haiku about rivers.") == ""  # it ends its turn at once
    assert chat.tokens == [
        ids["<s>"],
        *turn("system", "You are a helpful assistant."),
        *turn("user", "Write a haiku about rivers."),
        ids["<|im_start|>"],
        *sp.encode("assistant\n"),
    ]


# --- internlm2-graph chat -------------------------------------------------------------------


@pytest.fixture(scope="module")
def says_a(tiny_checkpoint, tmp_path_factory) -> Path:
    """Answers anything with "A" (the byte token <0x41>), then ends its turn."""
    folder = tmp_path_factory.mktemp("says-a")
    return steered_model(tiny_checkpoint, folder, "<0x41>", ("<0x41>", "<|im_end|>"))


def run_chat(model: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "internlm2_graph", "chat", str(model), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.model
def test_chat_prompt_answers_one_turn(says_a, capsys):
    assert main(["chat", str(says_a), "--prompt", "Hello", "--greedy"]) == 0
    assert capsys.readouterr().out == "A\n"


@pytest.mark.model
def test_chat_prompt_streams_until_max_new_tokens(rockets, capsys):
    assert main(["chat", str(rockets), "--prompt", "Hi", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "🚀" * 3 + "\n"  # 12 byte tokens, 4 per rocket


@pytest.mark.model
def test_chat_reads_turns_from_stdin_until_eof(says_a):
    result = run_chat(says_a, "--system", "Be brief.", stdin="Hello\n\nAnd again?\n/clear\nHi\n")
    assert (result.returncode, result.stdout) == (0, "A\nA\nA\n"), result.stderr


@pytest.mark.model
def test_chat_bye_ends_the_session(says_a):
    result = run_chat(says_a, stdin="Hello\n/bye\nnever answered\n")
    assert (result.returncode, result.stdout) == (0, "A\n"), result.stderr


@pytest.mark.model
def test_later_turns_reuse_the_cache_exactly(tiny_fp32, monkeypatch):
    """A turn continued from the KV cache decodes as the whole conversation encoded afresh."""
    turns = ["Hello there, how are you?", "Tell me about rivers.", "And lakes?"]

    def replies() -> list[str]:
        conversation = Chat(tiny_fp32, search={"do_sample": False}, max_new_tokens=6)
        return [conversation.reply(text) for text in turns]

    cached = replies()
    monkeypatch.setattr(chat_module, "common_prefix", lambda cached, prompt: 0)
    assert replies() == cached


@pytest.mark.model
def test_ctrl_c_ends_the_reply_and_keeps_what_was_said(rockets):
    conversation = Chat(rockets, max_new_tokens=40)
    pieces = []

    def interrupt_at_the_second_rocket(piece: str) -> None:
        pieces.append(piece)
        if "".join(pieces) == "🚀🚀":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conversation.reply("Hi", interrupt_at_the_second_rocket)
    assert conversation.messages[-1] == {"role": "assistant", "content": "🚀🚀"}
    assert conversation.reply("More") == "🚀" * 10  # the session goes on


@pytest.mark.model
def test_a_full_context_is_one_line_and_the_session_goes_on(says_a):
    result = run_chat(says_a, stdin="word " * 300 + "\nHi\n")
    assert result.returncode == 0 and result.stdout == "A\n"
    assert result.stderr.startswith("error: the conversation is ") and "max_length" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        ({}, {}),
        ({"temperature": 0.7}, {"temperature": 0.7, "do_sample": True}),
        ({"top_k": 5, "do_sample": False}, {"top_k": 5, "do_sample": False}),
        ({"temperature": 0}, {"do_sample": False}),
        ({"do_sample": True, "seed": 3}, {"do_sample": True, "random_seed": 3}),
    ],
)
def test_sampling_flags_override_only_what_they_name(flags, options):
    assert search_options(**flags) == options


# --- without a runtime ----------------------------------------------------------------------

NO_RUNTIME = 'pip install "internlm2_graph[cpu]"'
# Runs the CLI with onnxruntime_genai unimportable, as in an environment without [cpu]/[cuda].
HIDE_RUNTIME = """
import sys
sys.modules["onnxruntime_genai"] = None
from internlm2_graph.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.model
@pytest.mark.parametrize("command", ["chat", "verify"])
def test_no_runtime_is_one_line_naming_the_extra(command, says_a, tiny_checkpoint):
    args = {"chat": ["--prompt", "Hi"], "verify": ["--against", str(tiny_checkpoint)]}[command]
    result = subprocess.run(
        [sys.executable, "-c", HIDE_RUNTIME, command, str(says_a), *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and NO_RUNTIME in result.stderr
    assert "[cuda]" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_chat_example_without_runtime(says_a):
    script = HIDE_RUNTIME.replace(
        "from internlm2_graph.cli import main\nsys.exit(main(sys.argv[1:]))",
        f"import runpy\nsys.argv[0] = {str(CHAT_EXAMPLE)!r}\n"
        f"runpy.run_path({str(CHAT_EXAMPLE)!r}, run_name='__main__')",
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(says_a)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and NO_RUNTIME in result.stderr


@pytest.mark.model
@pytest.mark.skipif(og.is_cuda_available(), reason="this runtime has CUDA")
def test_cuda_folder_under_the_cpu_runtime_names_the_extra(tiny_checkpoint, tmp_path, capsys):
    build(tiny_checkpoint, tmp_path / "cuda", "fp16", "cuda")  # building needs no GPU
    code = main(["chat", str(tmp_path / "cuda"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "internlm2_graph[cuda]"' in err
    assert len(err.strip().splitlines()) == 1

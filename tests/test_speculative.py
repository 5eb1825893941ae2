"""Speculative decoding: what a build writes into genai_config, and that og's greedy output with
n-gram lookup or a draft model is token for token that of plain decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import sentencepiece as spm
from surgery import copy_checkpoint, steer

from internlm2_graph import InternLM2GraphError, build
from internlm2_graph.chat import default_speculative
from internlm2_graph.cli import main
from internlm2_graph.runtime import og_config
from internlm2_graph.speculative import DRAFT_TOKENS, NGRAM_SIZE, set_speculative, split_options
from internlm2_graph.synthetic import make_config, write_checkpoint

NEW_TOKENS = 48


def greedy(config: og.Config, prompt: list[int]) -> tuple[list[int], dict]:
    """The tokens after `prompt` (no early stop) and og's speculative counters."""
    model = og.Model(config)
    params = og.GeneratorParams(model)
    total = len(prompt) + NEW_TOKENS
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(prompt) :], generator.get_speculative_stats()


def genai(folder: Path) -> dict:
    return json.loads((folder / "genai_config.json").read_text())


@pytest.fixture(scope="module")
def cycle(tiny_checkpoint) -> list[int]:
    """Four ordinary tokens that the steered model repeats in a cycle."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    return [sp.piece_to_id(p) for p in ("▁the", "▁of", "▁and", "▁to")]


@pytest.fixture(scope="module")
def copier(tiny_checkpoint, cycle, tmp_path_factory) -> Path:
    """A checkpoint whose greedy reply repeats `cycle`: the copy-heavy case n-gram lookup wins."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("copier") / "ckpt")
    steer(folder, cycle[0], dict(zip(cycle, [*cycle[1:], cycle[0]])))
    return folder


@pytest.fixture(scope="module")
def self_draft(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("self-draft") / "model"
    build(tiny_checkpoint, out, "fp32", "cpu", {"draft": "int4"})
    return out


def copy_prompt(cycle: list[int]) -> list[int]:
    # The cycle twice, then a stray continuation of its first two tokens, so some lookups
    # propose a token the model rejects.
    return [1, *cycle, *cycle, cycle[0], cycle[1], 7, 8, cycle[0]]


@pytest.mark.model
def test_ngram_writes_the_speculative_section(tiny_checkpoint, tmp_path):
    options = {"speculative": "ngram", "ngram_size": "4", "max_draft_tokens": "8"}
    build(tiny_checkpoint, tmp_path / "out", extra_options=options)
    assert genai(tmp_path / "out")["speculative"] == {"max_draft_tokens": 8, "ngram_size": 4}
    assert "draft" not in genai(tmp_path / "out")["model"]


@pytest.mark.model
def test_off_writes_no_section(tiny_fp32):
    assert "speculative" not in genai(tiny_fp32)


@pytest.mark.model
def test_ngram_greedy_output_is_plain_decoding(copier, cycle, tmp_path):
    build(copier, tmp_path / "plain")
    build(copier, tmp_path / "ngram", extra_options={"speculative": "ngram"})
    prompt = copy_prompt(cycle)
    plain, _ = greedy(og.Config(str(tmp_path / "plain")), prompt)
    fast, stats = greedy(og.Config(str(tmp_path / "ngram")), prompt)
    assert fast == plain
    # The steering works: the reply goes round the cycle.
    assert set(plain[-8:]) == set(cycle) and plain[-4:] == plain[-8:-4]
    assert stats["draft_tokens_accepted"] > NEW_TOKENS // 2  # and the lookup finds it


@pytest.mark.model
@pytest.mark.parametrize("adaptive", [0, 2])
def test_ngram_on_random_weights_changes_no_token(tiny_fp32, adaptive):
    """Random weights: most proposals are wrong, so this exercises rejection and rewinding."""
    rng = np.random.default_rng(0)
    text = rng.integers(3, 1000, 12).tolist()
    prompt = [1, *text, *text, *text[:4]]
    plain, _ = greedy(og.Config(str(tiny_fp32)), prompt)
    config = og_config(tiny_fp32, "ngram")
    config.overlay(json.dumps({"speculative": {"min_adaptive_k": adaptive}}))
    fast, stats = greedy(config, prompt)
    assert fast == plain
    assert stats["rounds"] > 0


@pytest.mark.model
def test_self_draft_is_one_folder_og_runs_as_target_and_draft(self_draft, tiny_fp32):
    config = genai(self_draft)
    assert config["model"]["draft"]["filename"] == "draft/model.onnx"
    assert config["speculative"] == {"max_draft_tokens": DRAFT_TOKENS}
    assert genai(self_draft / "draft")["model"]["decoder"]["filename"] == "model.onnx"
    draft = onnx.load(str(self_draft / "draft" / "model.onnx"), load_external_data=False)
    bits = {a.i for n in draft.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}  # fmt: skip
    assert bits == {4}
    prompt = [1, *range(40, 60)]
    plain, _ = greedy(og.Config(str(tiny_fp32)), prompt)
    fast, stats = greedy(og.Config(str(self_draft)), prompt)
    assert fast == plain
    assert stats["draft_forward_passes"] > 0 and stats["draft_tokens_accepted"] > 0


@pytest.mark.model
def test_draft_from_another_built_folder(tiny_checkpoint, tiny_fp32, tmp_path):
    build(tiny_checkpoint, tmp_path / "small", "int8", "cpu")
    assert main(["-i", str(tiny_checkpoint), "-o", str(tmp_path / "big"), "-q",
                 "--draft", str(tmp_path / "small")]) == 0  # fmt: skip
    assert (tmp_path / "big" / "draft" / "model.onnx").is_file()
    prompt = [1, *range(100, 120)]
    plain, _ = greedy(og.Config(str(tiny_fp32)), prompt)
    fast, stats = greedy(og.Config(str(tmp_path / "big")), prompt)
    assert fast == plain and stats["draft_forward_passes"] > 0


@pytest.mark.model
def test_draft_with_another_vocabulary_is_refused(tiny_checkpoint, tmp_path, capsys):
    other = write_checkpoint(tmp_path / "other", make_config("tiny", vocab_size=1280), chat=True)
    build(other, tmp_path / "small", "int4", "cpu")
    code = main(["-i", str(tiny_checkpoint), "-o", str(tmp_path / "big"),
                 "--draft", str(tmp_path / "small")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "vocabulary differs" in err and "1280 vs 1024" in err
    assert not (tmp_path / "big").exists()


@pytest.mark.model
def test_draft_for_another_device_is_refused(tiny_checkpoint, tmp_path):
    build(tiny_checkpoint, tmp_path / "small", "int4", "cuda")
    with pytest.raises(InternLM2GraphError, match="rebuild the draft with -e cpu"):
        build(tiny_checkpoint, tmp_path / "big", extra_options={"draft": str(tmp_path / "small")})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"speculative": "medusa"}, "use one of off, ngram, draft"),
        ({"speculative": "ngram", "ngram_size": "1"}, "expected a whole number 2..16"),
        ({"speculative": "ngram", "max_draft_tokens": "17"}, "expected a whole number 1..16"),
        ({"speculative": "ngram", "min_adaptive_k": "x"}, "expected a whole number 0..16"),
        ({"ngram_size": "3"}, "need speculative=ngram or speculative=draft"),
        ({"speculative": "draft", "ngram_size": "3"}, "only applies to speculative=ngram"),
        ({"speculative": "ngram", "draft": "int4"}, "drop speculative=ngram"),
        ({"draft": "nowhere"}, "not int4/int8 and not a built model folder"),
    ],
)
def test_bad_speculative_options(options, message):
    with pytest.raises(InternLM2GraphError, match=message):
        split_options(options)


@pytest.mark.model
def test_switch_at_run_time_without_touching_the_folder(self_draft):
    before = (self_draft / "genai_config.json").read_bytes()
    prompt = [1, *range(200, 210), *range(200, 210)]
    runs = {mode: greedy(og_config(self_draft, mode), prompt) for mode in ("off", "ngram", "draft")}
    assert runs["off"][0] == runs["ngram"][0] == runs["draft"][0]
    assert runs["off"][1]["rounds"] == 0
    assert runs["ngram"][1]["ngram_lookup_hits"] + runs["ngram"][1]["ngram_lookup_misses"] > 0
    assert runs["draft"][1]["draft_forward_passes"] > 0
    assert (self_draft / "genai_config.json").read_bytes() == before


@pytest.mark.model
def test_set_speculative_rewrites_genai_config(tiny_checkpoint, tmp_path):
    build(tiny_checkpoint, tmp_path / "out", extra_options={"draft": "int4"})
    set_speculative(tmp_path / "out", "ngram")
    assert "draft" not in genai(tmp_path / "out")["model"]
    assert genai(tmp_path / "out")["speculative"]["ngram_size"] == NGRAM_SIZE
    set_speculative(tmp_path / "out", "draft")  # the draft comes back from draft/
    assert genai(tmp_path / "out")["model"]["draft"]["filename"] == "draft/model.onnx"
    set_speculative(tmp_path / "out", "off")
    assert "speculative" not in genai(tmp_path / "out")
    with pytest.raises(InternLM2GraphError, match="has no draft"):
        set_speculative(tmp_path / "out" / "draft", "draft")


@pytest.mark.model
def test_benchmark_runs_every_setting_with_plain_decodings_tokens(self_draft, monkeypatch):
    from argparse import Namespace

    from benchmarks import speculative as bench

    # Prompts that fit the tiny model's 256-token context.
    monkeypatch.setitem(bench.PROMPTS, "edit-code", ("copy", "Copy: a = b + c; a = b + c;"))
    models = bench.load_models(self_draft, "cpu")
    tokenizer = og.Tokenizer(models["target"])
    args = Namespace(gen=12, repeat=1, sample=False)
    cases = bench.measure(models, tokenizer, list(bench.SETTINGS), ["edit-code", "story"], args)
    rows = bench.summarize(cases, args.gen)
    assert [r["error"] for r in rows] == [None] * len(rows)
    assert all(r["identical"] for r in rows)
    assert {r["kind"] for r in rows} == {"copy", "free"}


@pytest.mark.model
def test_chat_turns_are_the_same_in_every_mode(self_draft):
    """Multi-turn, so later turns rewind the cache that speculative rounds wrote."""
    from internlm2_graph.chat import Chat

    turns = ["Hello there, how are you?", "Tell me about rivers.", "And lakes?"]

    def replies(mode: str | None) -> list[str]:
        chat = Chat(self_draft, search={"do_sample": False}, max_new_tokens=10, speculative=mode)
        return [chat.reply(text) for text in turns]

    assert replies("off") == replies("ngram") == replies("draft") == replies(None)


@pytest.mark.model
def test_chat_command_takes_speculative(self_draft, capsys):
    def say(*flags: str) -> str:
        args = ["chat", str(self_draft), "--prompt", "Hi", "--greedy", "--max-new-tokens", "8"]
        assert main([*args, *flags]) == 0
        return capsys.readouterr().out

    assert say("--speculative", "ngram") == say("--speculative", "off") == say()


@pytest.mark.model
def test_chat_defaults_to_ngram_where_measured(tiny_fp32, self_draft, tiny_checkpoint, tmp_path):
    greedy = {"do_sample": False}
    assert default_speculative(tiny_fp32, greedy) == "ngram"  # cpu, greedy, nothing asked for
    assert default_speculative(tiny_fp32, {"do_sample": True}) is None  # sampling: measured no gain
    assert default_speculative(self_draft, greedy) is None  # its own draft
    build(tiny_checkpoint, tmp_path / "cuda", "fp16", "cuda")
    assert default_speculative(tmp_path / "cuda", greedy) is None  # not measured on CUDA yet
    with pytest.raises(InternLM2GraphError, match="not a built model folder"):
        default_speculative(tmp_path)


def test_a_draft_on_cuda_is_refused(tiny_checkpoint, tmp_path, capsys):
    """og 0.18 loads no CUDA draft (measured on an H200): refused before anything is written."""
    code = main(["-i", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "-p", "fp16",
                 "-e", "cuda", "--draft", "int4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "loads a draft model on the CPU only" in err and not (tmp_path / "out").exists()

"""internlm2_graph.evaluate (`internlm2-graph eval`) on the tiny fp32 build: perplexity and KL
against the numpy reference, and the command's output and one-line errors."""

import json
import re
import shutil

import numpy as np
import pytest

from internlm2_graph.cli import main
from internlm2_graph.evaluate import Decoder, kl_and_top1, log_softmax, perplexity, windows
from internlm2_graph.reference import Reference
from internlm2_graph.tokenizer import exact_tokenizer


def reference_perplexity(checkpoint, ids: np.ndarray, window: int) -> float:
    reference, nll, count = Reference(checkpoint), 0.0, 0
    for part in windows(len(ids), window):
        logp = log_softmax(reference.forward(ids[part])[0][:-1])
        nll -= logp[np.arange(len(logp)), ids[part][1:]].sum()
        count += len(logp)
    return float(np.exp(nll / count))


def test_windows_cover_every_token_once():
    parts = list(windows(10, 4))
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    assert [(p.start, p.stop) for p in windows(9, 4)] == [(0, 4), (4, 8)]  # 1 token: no target


@pytest.mark.model
def test_perplexity_matches_the_reference(tiny_checkpoint, tiny_fp32):
    ids = np.random.default_rng(0).integers(3, 1000, 40)
    expected = reference_perplexity(tiny_checkpoint, ids, window=16)
    assert abs(perplexity(tiny_fp32, ids, window=16) / expected - 1) < 1e-4


@pytest.mark.model
def test_chunked_feeding_carries_the_kv_cache(tiny_fp32):
    ids = np.random.default_rng(1).integers(3, 1000, 24)
    decoder = Decoder(tiny_fp32)
    np.testing.assert_allclose(decoder.logits(ids, chunk=5), decoder.logits(ids), atol=1e-4)


@pytest.mark.model
def test_a_model_against_itself(tiny_fp32):
    ids = np.random.default_rng(2).integers(3, 1000, 30)
    quality = kl_and_top1(tiny_fp32, tiny_fp32, ids, window=16, chunk=7)
    assert quality.tokens == 28
    assert abs(quality.kl) < 1e-6 and quality.top1 == 1.0
    assert abs(quality.perplexity / quality.reference_perplexity - 1) < 1e-5


def test_eval_command_scores_ids_against_a_reference(tiny_checkpoint, tiny_fp32, tmp_path, capsys):
    ids = np.random.default_rng(3).integers(3, 1000, 40)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    text = str(tmp_path / "ids.json")
    assert main(["eval", str(tiny_fp32), "--text", text, "--window", "16"]) == 0
    expected = reference_perplexity(tiny_checkpoint, ids, window=16)
    ppl, tokens = re.fullmatch(r"ppl ([\d.]+), (\d+) tokens\n", capsys.readouterr().out).groups()
    assert abs(float(ppl) / expected - 1) < 1e-4 and tokens == "40"
    assert main(["eval", str(tiny_fp32), "--text", text, "--reference", str(tiny_fp32)]) == 0
    assert "KL 0.0000 nats, top-1 agreement 100.0%, 39 tokens" in capsys.readouterr().out


def test_eval_command_encodes_text_with_the_folders_tokenizer(tiny_fp32, tmp_path, capsys):
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    ids = exact_tokenizer(tiny_fp32).encode((tmp_path / "prose.txt").read_text()).ids
    assert main(["eval", str(tiny_fp32), "--text", str(tmp_path / "prose.txt")]) == 0
    assert capsys.readouterr().out.endswith(f", {len(ids)} tokens\n")


def test_eval_command_refuses_bad_input_in_one_line(tiny_fp32, tmp_path, capsys):
    (tmp_path / "big.json").write_text(json.dumps([1, 2, 10**6]))
    (tmp_path / "one.json").write_text("[5]")
    (tmp_path / "text.json").write_text('{"ids": [1, 2]}')
    cases = {
        str(tmp_path / "missing.txt"): "missing.txt: no such file",
        str(tmp_path / "big.json"): "token id 1000000 is outside its vocabulary",
        str(tmp_path / "one.json"): "one.json: 1 token(s); scoring needs at least 2",
        str(tmp_path / "text.json"): "expected a JSON list of token ids",
    }
    for path, message in cases.items():
        assert main(["eval", str(tiny_fp32), "--text", path]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["eval", str(tmp_path), "--text", str(tmp_path / "one.json")]) == 2
    assert "not a built model folder" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(tiny_fp32, other)
    genai = json.loads((other / "genai_config.json").read_text())
    genai["model"]["vocab_size"] += 1
    (other / "genai_config.json").write_text(json.dumps(genai))
    (tmp_path / "ok.json").write_text("[5, 6, 7]")
    args = ["eval", str(tiny_fp32), "--text", str(tmp_path / "ok.json"), "--reference", str(other)]
    assert main(args) == 2
    assert "but " + str(tiny_fp32) + " has" in capsys.readouterr().err

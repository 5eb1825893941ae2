"""benchmarks/quality.py on the tiny fp32 build: perplexity and KL against the numpy reference."""

import numpy as np
import pytest

from benchmarks.quality import Decoder, kl_and_top1, log_softmax, perplexity, windows
from internlm2_graph.reference import Reference


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

"""calibration/forward.py, the streamed float32 decoder every calibration method runs on, against
reference.py's float64 forward: the oracle it never shares code with.

Sequences are packed end to end, each from position 0, one layer's weights in memory at a time;
the reference runs each sequence on its own. Hidden states, keys and values must agree to
float32's precision, with GQA, with biases and with linear rotary scaling.
"""

import numpy as np
import pytest

from internlm2_graph.calibration.forward import float_forward
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.reference import Cache, Reference
from internlm2_graph.synthetic import make_config, write_checkpoint

CHECKPOINTS = {
    "gqa": {},
    "bias": {"bias": True},
    "linear-rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    config = make_config("tiny", max_position_embeddings=64, **CHECKPOINTS[request.param])
    return write_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=3)


def sequences(config: InternLM2Config) -> list[np.ndarray]:
    """Unequal lengths, up to the whole context (calibration cuts its sequences to that)."""
    rng = np.random.default_rng(11)
    lengths = (1, 17, 40, config.max_position_embeddings)
    return [rng.integers(0, config.vocab_size, n).astype(np.int64) for n in lengths]


def test_the_streamed_hidden_states_are_the_references(checkpoint):
    config = InternLM2Config.from_dir(checkpoint)
    parts = sequences(config)
    kv = {}

    def seen(layer, keys, values):
        kv[layer] = (keys.copy(), values.copy())

    got = float_forward(Checkpoint(checkpoint), config, parts, on_kv=seen)
    reference = Reference(checkpoint)
    assert got.dtype == np.float32 and got.shape == (sum(map(len, parts)), config.hidden_size)
    start = 0
    for ids in parts:
        cache = Cache()
        want = reference.hidden_states(ids, cache)
        stop = start + len(ids)
        np.testing.assert_allclose(got[start:stop], want, rtol=0, atol=2e-4 * np.abs(want).max())
        for layer, (keys, values) in kv.items():
            # The reference caches values as they are and keys after rotary; the first
            # position's rotation is the identity, so its keys compare before rotary too.
            want_v = cache.values[layer].transpose(1, 0, 2)  # [seq, kv_heads, head_dim]
            np.testing.assert_allclose(values[start:stop], want_v, atol=2e-4 * np.abs(want_v).max())
            want_k0 = cache.keys[layer][:, 0]
            np.testing.assert_allclose(keys[start], want_k0, atol=2e-4 * np.abs(want_k0).max())
        start = stop
    assert len(kv) == config.num_hidden_layers

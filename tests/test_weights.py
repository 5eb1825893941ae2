"""The grouped wqkv -> [Q | K | V] transform, on its own, at real and random shapes."""

import numpy as np
from helpers import ArrayRows
from hypothesis import example, given
from hypothesis import strategies as st

from internlm2_graph.config import InternLM2Config
from internlm2_graph.synthetic import make_config
from internlm2_graph.weights import split_wqkv, wqkv_to_qkv


def config_for(kv_heads: int, group: int, head_dim: int) -> InternLM2Config:
    heads = kv_heads * group
    return InternLM2Config.from_dict(
        make_config(
            "tiny",
            hidden_size=heads * head_dim,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
        )
    )


def labelled_rows(config: InternLM2Config) -> np.ndarray:
    """Row r of wqkv holds r, so a permutation shows up as the labels it moved."""
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return np.arange(rows, dtype=np.int64)


def expected_labels(config: InternLM2Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Straight from the layout's definition: rows viewed as [kv_heads, group + 2, head_dim]."""
    g, d = config.group, config.head_dim

    def row(group_index: int, slot: int, i: int) -> int:
        return (group_index * (g + 2) + slot) * d + i

    q = [row(j // g, j % g, i) for j in range(config.num_attention_heads) for i in range(d)]
    k = [row(h, g, i) for h in range(config.num_key_value_heads) for i in range(d)]
    v = [row(h, g + 1, i) for h in range(config.num_key_value_heads) for i in range(d)]
    return np.array(q), np.array(k), np.array(v)


@given(
    kv_heads=st.integers(1, 8),
    group=st.integers(1, 8),
    head_dim=st.sampled_from([2, 4, 8, 16, 64, 128]),
)
@example(kv_heads=8, group=2, head_dim=128)  # 1.8B
@example(kv_heads=8, group=4, head_dim=128)  # 7B
@example(kv_heads=8, group=6, head_dim=128)  # 20B
@example(kv_heads=1, group=8, head_dim=4)  # MQA
def test_split_follows_the_grouped_layout(kv_heads, group, head_dim):
    config = config_for(kv_heads, group, head_dim)
    q, k, v = split_wqkv(labelled_rows(config), config)
    eq, ek, ev = expected_labels(config)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(k, ek)
    np.testing.assert_array_equal(v, ev)
    packed = wqkv_to_qkv(labelled_rows(config), config)
    np.testing.assert_array_equal(packed, np.concatenate([eq, ek, ev]))
    assert sorted(packed.tolist()) == labelled_rows(config).tolist()  # a permutation


def test_split_real_7b_weight_moves_whole_rows():
    config = InternLM2Config.from_dict(make_config("7b"))
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    rng = np.random.default_rng(0)
    wqkv = rng.standard_normal((rows, 64), dtype=np.float32)  # real row count, narrow columns
    q, k, v = split_wqkv(wqkv, config)
    g, d = config.group, config.head_dim
    # query head 5 = group 1, slot 1; key head 3 = slot g of group 3; value head 7 = slot g + 1
    np.testing.assert_array_equal(
        q[5 * d : 6 * d], wqkv[(1 * (g + 2) + 1) * d : (1 * (g + 2) + 2) * d]
    )
    np.testing.assert_array_equal(
        k[3 * d : 4 * d], wqkv[(3 * (g + 2) + g) * d : (3 * (g + 2) + g + 1) * d]
    )
    np.testing.assert_array_equal(
        v[7 * d : 8 * d], wqkv[(7 * (g + 2) + g + 1) * d : (8 * (g + 2)) * d]
    )


@given(kv_heads=st.integers(1, 4), group=st.integers(1, 6), head_dim=st.sampled_from([2, 4, 8]))
def test_regrouped_rows_read_a_slice_equal_the_whole_regroup(kv_heads, group, head_dim):
    """wqkv is regrouped as a row permutation, one run of rows per head: any slice of it is the
    same slice of the whole-tensor transform, and reads only the rows it needs."""
    from internlm2_graph.weights import PermutedRows, qkv_order

    config = config_for(kv_heads, group, head_dim)
    wqkv = labelled_rows(config)
    source = ArrayRows(wqkv)
    regrouped = PermutedRows(source, qkv_order(config))
    whole = wqkv_to_qkv(wqkv, config)
    rows = whole.shape[0]
    for start, stop in [(0, rows), (1, rows - 1), (head_dim // 2, head_dim * 3 // 2)]:
        source.asked.clear()
        np.testing.assert_array_equal(regrouped.rows(start, stop), whole[start:stop])
        assert sum(b - a for a, b in source.asked) == max(stop - start, 0)


def test_sliced_transforms_equal_whole_ones(monkeypatch):
    """Large tensors are transposed and quantized a slice of rows at a time, invisibly."""
    from internlm2_graph import weights
    from internlm2_graph.precision import QuantSpec
    from internlm2_graph.quantize import quantize

    rng = np.random.default_rng(3)
    w = rng.standard_normal((1000, 96), dtype=np.float32)
    rows = ArrayRows(w)
    monkeypatch.setattr(weights, "SLICE_BYTES", 96 * 4 * 64)  # 64 rows per slice
    for spec in (
        QuantSpec(bits=4, block_size=32),
        QuantSpec(bits=8, block_size=16, symmetric=False),
    ):
        sliced, whole = weights.quantize_source(rows, spec), quantize(w, spec)
        np.testing.assert_array_equal(sliced.packed, whole.packed)
        np.testing.assert_array_equal(sliced.scales, whole.scales)
        if spec.symmetric:
            assert sliced.zero_points is None
        else:
            np.testing.assert_array_equal(sliced.zero_points, whole.zero_points)

    class Param:
        dtype = weights.ir.DataType.FLOAT16

    np.testing.assert_array_equal(weights.transposed(rows, Param()), w.T.astype(np.float16))

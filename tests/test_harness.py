"""The benchmark harness end to end on the tiny checkpoint: every suite runs, in seconds, and
its rows follow the one schema (machine, versions, spread); tables come out in md/csv/json."""

import csv
import io
import json

import pytest

from benchmarks import rows
from benchmarks.__main__ import main
from benchmarks.suites import SUITES

pytestmark = pytest.mark.model  # every test here builds or runs a model

METRICS = {
    "export": {"seconds", "peak_rss_gb", "output_gb"},
    "decode": {"prompt_tok_s", "gen_tok_s"},
    "quality": {"ppl", "kl", "top1", "reference_ppl"},
    "speculative": {"tok_s", "speedup", "acceptance"},
    "kernels": {"us_per_run"},
    "serving": {
        "output_tok_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "tpot_p99_s",
        "speedup_vs_1_client",
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness") / "rows.json"
    suites = ",".join(SUITES)
    assert main(["run", suites, "--model", "tiny", "--smoke", "-p", "int4", "--out", str(out)]) == 0
    return rows.read(out)


def test_every_suite_gives_its_metrics(smoke_rows):
    assert set(METRICS) == set(SUITES)
    for suite, metrics in METRICS.items():
        assert {r.metric for r in smoke_rows if r.suite == suite} == metrics, suite


def test_rows_record_where_and_with_what_they_ran(smoke_rows):
    for row in smoke_rows:
        assert row.machine and row.cpu and row.date and row.source == "rows.json"
        assert row.versions["python"] and row.versions["onnxruntime"]
        assert row.value == row.value  # not NaN
        if row.runs > 1:
            assert row.low <= row.value <= row.high
    kl = next(r for r in smoke_rows if r.suite == "quality" and r.metric == "kl")
    assert 0 < kl.value < 1  # int4 moved the logits, a little


def test_tables_in_three_formats(smoke_rows):
    md = rows.table(smoke_rows).splitlines()
    assert md[0].startswith("| suite | model |") and len(md) == len(smoke_rows) + 2
    parsed = list(csv.DictReader(io.StringIO(rows.table(smoke_rows, "csv"))))
    assert [float(r["value"]) for r in parsed] == [r.value for r in smoke_rows]
    assert json.loads(rows.table(smoke_rows, "json"))[0]["suite"] == smoke_rows[0].suite


def test_unknown_suite_or_setting_is_refused(capsys):
    assert main(["run", "decode,nope"]) == 2
    assert "unknown suite ['nope']" in capsys.readouterr().err
    assert main(["run", "decode", "--tools", "ours,theirs"]) == 2
    assert "--tools takes ours and/or builder" in capsys.readouterr().err
    assert main(["run", "decode", "--param", "gen"]) == 2
    assert "--param takes KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown --param"):
        main(["run", "kernels", "--smoke", "--param", "lenghts=16"])
    with pytest.raises(SystemExit, match="has no study 'nope'; its studies: long_context"):
        main(["run", "decode", "--param", "study=nope"])
    with pytest.raises(SystemExit, match="unknown --param"):
        main(["run", "decode", "--param", "study=long_context", "contexs=16"])


def test_list_shows_each_suites_studies_and_their_settings(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for suite in SUITES.values():
        for name in getattr(suite, "STUDIES", {}):
            assert f"study={name} " in listed, name
    assert "settings: folders=, capacity=, contexts=4096,32768,131072" in listed


# The studies that run on the tiny checkpoint on a CPU, and the metrics their rows carry (the
# others need real weights, llama.cpp, the builder or CUDA).
STUDIES = {
    ("export", "sizes"): {"seconds", "peak_rss_gb", "output_gb"},
    ("export", "peak_rss"): {"seconds", "peak_rss_gb"},
    ("decode", "long_context"): {"prompt_tok_s", "gen_tok_s"},
    ("quality", "cuda_parity"): {"max_rel_error", "top1", "tokens_equal"},
    ("quality", "calibrated"): {"kl", "top1", "bits_per_weight", "seconds", "peak_rss_gb"},
    ("quality", "tokenizer"): {"paragraphs_agree", "tokens_agree", "seconds", "pieces_whole"},
}


@pytest.mark.parametrize(("suite", "study"), STUDIES)
def test_studies_return_rows_on_the_tiny_checkpoint(tmp_path, suite, study):
    out = tmp_path / "rows.json"
    args = ["run", suite, "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert main([*args, "--param", f"study={study}"]) == 0
    found = rows.read(out)
    assert {r.metric for r in found} == STUDIES[suite, study]
    assert all(r.suite == suite and r.machine and r.value == r.value for r in found)


def test_serving_measures_a_given_folder_and_engine_load_its_engine(tmp_path, tiny_checkpoint):
    """folder= serves a built folder instead of building; study=engine_load drives og.Engine on
    given folders (the CPU's static engine here; paged folders on CUDA)."""
    from internlm2_graph import build

    folder = tmp_path / "int4"
    build(tiny_checkpoint, folder, "int4", "cpu")
    common = ["--smoke", "--repeat", "1", "--workdir", str(tmp_path / "work")]
    served, loaded = tmp_path / "served.json", tmp_path / "loaded.json"
    assert (
        main(["run", "serving", *common, "--out", str(served), "--param", f"folder={folder}"]) == 0
    )
    variants = {r.variant for r in rows.read(served)}
    assert variants and all(v.startswith("int4 cpu ") for v in variants), variants
    assert {r.model for r in rows.read(served)} == {"int4"}  # the folder's name
    args = ["--label", "given", "--param", "study=engine_load", f"folders=tiny={folder}"]
    assert main(["run", "serving", *common, "--out", str(loaded), *args]) == 0
    assert {r.model for r in rows.read(loaded)} == {"given"}
    found = {(r.variant, r.metric): r.value for r in rows.read(loaded)}
    assert found["closed_loop x2", "output_tok_s"] > 0
    assert found["identical x2", "identical_share"] == 1.0

"""og.Engine under load: continuous batching of paged folders (use_paged_attention=true).

Closed loop: N streams, each sending requests of `prompt` random tokens with exactly `output`
greedy tokens generated, the next as soon as its last one finishes, `requests` of them per
stream; all streams start together. Reported per model and N: output tok/s over the run, time to
first token and time per output token (p50, p99 over the requests). Mixed: chat-like
conversations (a shared system prompt, user turns and replies of random lengths, several turns
in one request), the same numbers plus the prompt tokens og served from its cache. `generator`
rows are one stream through og.Generator on a GroupQueryAttention folder (our CUDA-graph
decode), the baseline a single engine stream is held to.

    python -m benchmarks run serving -e cuda --param study=engine_load \
        folders=ours=FOLDER,builder=FOLDER streams=1,8,32,64,128 resend=true
    python -m benchmarks run serving -e cuda --param study=engine_load folders=ours=FOLDER \
        identical=64                     # concurrent vs alone
    ... trace=64 trace_mixed=true        # GPU time by kernel kind: a decode step, the chat run

`measure(params)` gives flat dicts (one per model x measurement); `run(ctx)` turns them into the
harness's rows (benchmarks/rows.py). Models run in turn, rounds (`--repeat`) alternate the order.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks import common

TOKEN_LOW = 100  # random prompt ids start here: clear of special and byte-fallback tokens


def genai():
    import onnxruntime_genai as og

    return og


# --- one engine, many streams -----------------------------------------------------------------


def drive(
    engine,
    streams: list[list[tuple[np.ndarray, int]]],
    same_request: bool,
    after_run=None,
    limit_s: float = 300.0,
    resend: bool = False,
) -> list[dict]:
    """Run every stream's turns in order, all streams at once, as fast as the engine serves
    them. A turn is (new prompt tokens, tokens to generate[, opens a conversation]); with
    `same_request` a stream's turns continue one conversation (one og request), else each turn
    is a request of its own; with `resend` too, as an OpenAI client does, each request carries
    the whole conversation so far (earlier prompts and replies), so only og's prefix cache can
    spare recomputing it.
    One record per turn: times, tokens, og's usage. `after_run(n)` is called after the n-th
    engine.run (one engine step). Raises when the engine idles or `limit_s` passes with turns
    still open (a request og never schedules must not hang a timed device call)."""
    og = genai()
    finished_flag, token_flag = (
        int(og.EngineEventFlags.TURN_FINISHED),
        int(og.EngineEventFlags.TOKEN),
    )
    failed_flag = int(og.EngineEventFlags.FAILED)
    buffer = engine.create_event_buffer(4096)
    requests: dict[int, object] = {}
    closed: list[object] = []  # kept alive, so that no new request reuses a closed one's id
    active: dict[int, dict] = {}  # id(request) -> the record of its running turn
    position = [0] * len(streams)
    records: list[dict] = []
    history: list[np.ndarray] = [np.zeros(0, np.int64) for _ in streams]

    def begin(stream: int) -> None:
        tokens, generate, *opens = streams[stream][position[stream]]
        if resend:
            before = np.zeros(0, np.int64) if opens and opens[0] else history[stream]
            tokens = history[stream] = np.concatenate([before, tokens])
        if stream not in requests or not same_request:
            requests[stream] = engine.create_request()
        request = requests[stream]
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(generate)
        options.set_min_generated_tokens(generate)
        record = {"stream": stream, "turn": position[stream], "prompt": len(tokens)}
        record.update(start=time.perf_counter(), first=None, end=None, ids=[], failed=None)
        active[id(request)] = record
        request.begin_turn(np.asarray(tokens, dtype=np.int32), options)

    for stream in range(len(streams)):
        begin(stream)
    runs, deadline = 0, time.perf_counter() + limit_s
    while active:
        if not engine.has_pending_requests() or time.perf_counter() > deadline:
            raise RuntimeError(f"og.Engine left {len(active)} turns open after {runs} steps")
        events = engine.run(buffer)
        runs += 1
        if after_run is not None:
            after_run(runs)
        for event in events:
            now, flags = time.perf_counter(), int(event.flags)
            record = active.get(id(event.request))
            if record is None:
                continue
            if flags & token_flag:
                record["first"] = record["first"] or now
                record["ids"].append(int(event.token))
            if flags & failed_flag:
                record["failed"] = str(event.error_code)
            if flags & (finished_flag | failed_flag):
                record["end"] = now
                usage = event.usage
                record["cached"] = usage.cached_prompt_tokens if usage else None
                del active[id(event.request)]
                records.append(record)
                stream = record["stream"]
                if resend:
                    history[stream] = np.concatenate([history[stream], record["ids"]])
                position[stream] += 1
                if not same_request:
                    closed.append(requests.pop(stream))
                    closed[-1].close()
                if position[stream] < len(streams[stream]):
                    begin(stream)
    for request in requests.values():
        request.close()
    return records


def summarize(records: list[dict]) -> dict:
    """Output tok/s over the run; TTFT and TPOT percentiles over the turns (milliseconds)."""
    done = [r for r in records if r["failed"] is None and r["first"] is not None]
    tokens = sum(len(r["ids"]) for r in done)
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    ttft = [1e3 * (r["first"] - r["start"]) for r in done]
    tpot = [1e3 * (r["end"] - r["first"]) / (len(r["ids"]) - 1) for r in done if len(r["ids"]) > 1]
    prompt = sum(r["prompt"] for r in done)
    cached = sum(r.get("cached") or 0 for r in done)
    return {
        "turns": len(records),
        "failed": len(records) - len(done),
        "output_tokens": tokens,
        "seconds": wall,
        "output_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50_ms": _percentile(ttft, 50),
        "ttft_p99_ms": _percentile(ttft, 99),
        "tpot_p50_ms": _percentile(tpot, 50),
        "tpot_p99_ms": _percentile(tpot, 99),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# --- workloads --------------------------------------------------------------------------------


def closed_loop_streams(
    streams: int, requests: int, prompt: int, output: int, vocab: int, seed: int
) -> list[list[tuple[np.ndarray, int]]]:
    """Distinct random prompts (no shared prefix for a cache to find)."""
    rng = np.random.default_rng(seed)
    return [
        [(rng.integers(TOKEN_LOW, vocab, prompt), output) for _ in range(requests)]
        for _ in range(streams)
    ]


def chat_streams(params: dict, vocab: int, seed: int, system_seed: int | None = None) -> list:
    """Chat-like traffic: every conversation opens with the same system prompt (`system`
    tokens), then user turns of 16..`user_max` tokens and replies of 32..`reply_max` tokens,
    `turns` rounds in one request. `system_seed`: another draw of the turns around the system
    prompt of that seed."""
    rng = np.random.default_rng(seed)
    system = rng.integers(TOKEN_LOW, vocab, params["system"])
    if system_seed is not None:
        rng = np.random.default_rng([system_seed, 1])
    streams = []
    for _ in range(params["conversations"]):
        chat = []
        for turn in range(params["turns"]):
            user = rng.integers(TOKEN_LOW, vocab, int(rng.integers(16, params["user_max"] + 1)))
            tokens = np.concatenate([system, user]) if turn == 0 else user
            chat.append((tokens, int(rng.integers(32, params["reply_max"] + 1))))
        streams.append(chat)
    return streams


def vocab_size(folder: Path) -> int:
    import json

    return json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"]


def open_engine(folder: Path):
    og = genai()
    model = og.Model(str(folder))
    return model, og.Engine(model)


def closed_loop(engine, folder: Path, streams: int, params: dict, seed: int) -> dict:
    vocab = vocab_size(folder)
    # Warm-up at this concurrency: graph capture for this batch size, allocator growth.
    warm = closed_loop_streams(streams, 1, params["prompt"], 16, vocab, seed + 1)
    drive(engine, warm, same_request=False)
    work = closed_loop_streams(
        streams, params["requests"], params["prompt"], params["output"], vocab, seed
    )
    return summarize(drive(engine, work, same_request=False))


def mixed(engine, folder: Path, params: dict, seed: int) -> dict:
    work = chat_streams(params, vocab_size(folder), seed)
    return summarize(drive(engine, work, same_request=True))


def resent(engine, folder: Path, params: dict, seed: int) -> dict:
    """The chat traffic as HTTP clients send it: every turn a new request with the whole
    conversation; each stream holds two conversations in turn, so the second finds the shared
    system prompt, and every later turn its own history, in og's prefix cache if it keeps one."""
    vocab = vocab_size(folder)
    first = chat_streams(params, vocab, seed)
    second = chat_streams(params, vocab, seed, system_seed=seed)
    work = [
        [(t, n, i == 0) for i, (t, n) in enumerate(a)]
        + [(t, n, i == 0) for i, (t, n) in enumerate(b)]
        for a, b in zip(first, second)
    ]
    return summarize(drive(engine, work, same_request=False, resend=True))


def identical(engine, folder: Path, streams: int, output: int, seed: int) -> dict:
    """The same prompts greedy, all at once and each alone: the share of identical replies,
    and where the others first differ (batched fp16 kernels may round differently)."""
    work = closed_loop_streams(streams, 1, 128, output, vocab_size(folder), seed)
    together = {r["stream"]: r["ids"] for r in drive(engine, work, same_request=False)}
    alone = {}
    for stream, turns in enumerate(work):
        alone[stream] = drive(engine, [turns], same_request=False)[0]["ids"]
    again = drive(engine, [work[0]], same_request=False)[0]["ids"]  # alone twice: deterministic?
    first_difference = [
        next((i for i, (a, b) in enumerate(zip(together[s], alone[s])) if a != b), None)
        for s in range(streams)
    ]
    differing = [i for i in first_difference if i is not None]
    return {
        "streams": streams,
        "output": output,
        "identical_share": 1 - len(differing) / streams,
        "first_difference": differing,
        "alone_repeatable": again == alone[0],
    }


def trace(engine, folder: Path, streams: int, params: dict, settle: int = 24, steps: int = 32):
    """Where a decode step's time goes at `streams` concurrent streams: CUPTI (torch.profiler)
    over `steps` engine steps once every stream is decoding; GPU busy time by kernel kind
    (benchmarks.kernel_profile's grouping) against the wall time of a step; the difference is
    the GPU waiting for the host (the engine's scheduling, sampling, input copies)."""
    import torch

    vocab = vocab_size(folder)
    drive(engine, closed_loop_streams(streams, 1, params["prompt"], 16, vocab, 1), False)
    work = closed_loop_streams(streams, 1, params["prompt"], settle + steps + 8, vocab, 2)
    prof, clock = _profiler(), {}

    def after_run(n: int) -> None:
        if n == settle:
            torch.cuda.synchronize()
            prof.__enter__()
            clock["start"] = time.perf_counter()
        elif n == settle + steps:
            torch.cuda.synchronize()
            clock["wall"] = time.perf_counter() - clock["start"]
            prof.__exit__(None, None, None)

    drive(engine, work, same_request=False, after_run=after_run)
    kinds = _kernel_ms(prof, steps)
    busy = sum(kinds.values())
    step = 1e3 * clock["wall"] / steps
    return {
        "streams": streams,
        "step_ms": step,
        "gpu_busy_ms": busy,
        "gpu_idle_share": 1 - busy / step,
        "kernels_ms_per_step": kinds,
        "output_tok_s": streams / (step / 1e3),
    }


def trace_mixed(engine, folder: Path, params: dict) -> dict:
    """Where the chat traffic's time goes (prompt-heavy, unlike a decode step): CUPTI over the
    whole mixed run, GPU busy time by kernel kind against its wall time."""
    import torch

    prof = _profiler()
    torch.cuda.synchronize()
    with prof:
        start = time.perf_counter()
        result = mixed(engine, folder, params, seed=7)
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - start)
    kinds = _kernel_ms(prof, 1)
    busy = sum(kinds.values())
    return {
        "streams": params["conversations"],
        "run_ms": wall,
        "gpu_busy_ms": busy,
        "gpu_idle_share": 1 - busy / wall,
        "kernels_ms": kinds,
        "output_tok_s": result["output_tok_s"],
    }


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def _kernel_ms(prof, per: int) -> dict:
    """GPU milliseconds by kernel kind (benchmarks.kernel_profile's grouping), divided by `per`."""
    from torch.autograd import DeviceType

    from benchmarks.kernel_profile import kind_of

    kinds: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kind = kind_of(event.name)
            kinds[kind] = kinds.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3 / per
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def generator_decode(folder: Path, prompt: int, output: int, repeat: int) -> dict:
    """One stream through og.Generator: ms per output token (median of `repeat` runs)."""
    from benchmarks.runtime import load, one_run

    model = load(Path(folder), "cuda")
    rng = np.random.default_rng(0)
    tokens = rng.integers(TOKEN_LOW, vocab_size(folder), prompt).astype(np.int32)
    one_run(model, tokens, 8)  # warm-up
    times = [one_run(model, tokens, output)[1] / output for _ in range(repeat)]
    return {
        "tpot_p50_ms": 1e3 * statistics.median(times),
        "tpot_spread_ms": 1e3 * (max(times) - min(times)),
        "output_tok_s": 1 / statistics.median(times),
        "runs": len(times),
    }


# --- the harness entry point ------------------------------------------------------------------

DEFAULTS = {
    "streams": [1, 8, 32, 64, 128],
    "prompt": 128,
    "output": 256,
    "requests": 2,
    "rounds": 1,
    "conversations": 32,
    "turns": 3,
    "system": 512,
    "user_max": 256,
    "reply_max": 384,
    "mixed": True,
    "resend": False,
    "identical": 0,
    "identical_output": 64,
    "generator": {},  # label -> a GroupQueryAttention folder
    "generator_repeat": 3,
    "trace": 0,  # streams to trace a decode step at (0: no trace)
    "trace_mixed": False,  # trace the whole chat traffic run too
}


def measure(params: dict) -> list[dict]:
    """Flat dicts: {model, measurement, streams, round, ...numbers}. params: `models` (label ->
    paged folder) plus any of DEFAULTS. One engine is open at a time (two 7B fp16 engines and
    their block pools do not fit one 80 GB GPU together); the order alternates by round."""
    params = {**DEFAULTS, **params}
    rows = []
    for label, folder in params["generator"].items():
        row = generator_decode(
            Path(folder), params["prompt"], params["output"], params["generator_repeat"]
        )
        rows.append({"model": label, "measurement": "generator", "streams": 1, **row})
        print(_line(rows[-1]), flush=True)
    for round_ in range(params["rounds"]):
        for label, folder in _alternating(params["models"], round_):
            try:
                rows += _one_engine(label, Path(folder), round_, params)
            except Exception as err:  # one setting that fails must not cost the others' rows
                print(f"{label}: FAILED {type(err).__name__}: {err}", flush=True)
    return rows


def _one_engine(label: str, folder: Path, round_: int, params: dict) -> list[dict]:
    import gc

    start = time.perf_counter()
    model, engine = open_engine(folder)
    print(f"{label}: engine open in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    base = {"model": label, "round": round_}
    for streams in params["streams"]:
        row = closed_loop(engine, folder, streams, params, seed=streams)
        rows.append(
            {**base, "measurement": "closed_loop", "streams": streams,
             "prompt": params["prompt"], "output": params["output"], **row}
        )  # fmt: skip
        print(_line(rows[-1]), flush=True)
    if params["mixed"]:
        row = mixed(engine, folder, params, seed=7)
        rows.append({**base, "measurement": "mixed", "streams": params["conversations"], **row})
        print(_line(rows[-1]), flush=True)
    if params["resend"]:
        row = resent(engine, folder, params, seed=7)
        rows.append({**base, "measurement": "resend", "streams": params["conversations"], **row})
        print(_line(rows[-1]), flush=True)
    first = label == next(iter(params["models"]))
    for measurement in ("trace", "trace_mixed", "identical"):
        # The identity check (a minute of 7B decoding) runs for the first model only.
        if params[measurement] and round_ == 0 and (first or measurement != "identical"):
            try:
                if measurement == "trace":
                    row = trace(engine, folder, params["trace"], params)
                elif measurement == "trace_mixed":
                    row = trace_mixed(engine, folder, params)
                else:
                    output = params["identical_output"]
                    row = identical(engine, folder, params["identical"], output, 3)
            except Exception as err:  # the throughput rows above stand without it
                row = {"error": f"{type(err).__name__}: {err}"}
            rows.append({**base, "measurement": measurement, **row})
            print(rows[-1], flush=True)
    del engine, model
    gc.collect()
    return rows


def _alternating(models: dict, round_: int) -> list:
    items = list(models.items())
    return items if round_ % 2 == 0 else items[::-1]


def _line(row: dict) -> str:
    keys = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    numbers = " ".join(f"{k}={common.fmt(row.get(k))}" for k in keys if k in row)
    return f"{row['model']:>10} {row['measurement']:>11} x{row.get('streams', '')}: {numbers}"


# --- the harness's study: `benchmarks run serving --param study=engine_load` ------------------

PARAMS = {  # folders / generator: NAME=DIR,... (paged folders / GroupQueryAttention folders)
    "folders": "",
    "generator": "",
    "streams": "1,8,32,64,128",
    "prompt": 128,
    "output": 256,
    "requests": 2,
    "mixed": True,
    "resend": False,
    "identical": 0,
    "trace": 0,
    "trace_mixed": False,
}
SMOKE = {"streams": "1,2", "prompt": 8, "output": 4, "requests": 1, "identical": 2, "mixed": False}
UNITS = {"output_tok_s": "tok/s", "identical_share": "", "step_ms": "ms", "gpu_busy_ms": "ms"}
UNITS.update({"run_ms": "ms", "gpu_idle_share": ""})
UNITS.update({f"{k}_{q}_ms": "ms" for k in ("ttft", "tpot") for q in ("p50", "p99")})
DETAILS = ("first_difference", "kernels_ms_per_step", "kernels_ms")  # into params, not metrics


def run(ctx) -> list:
    from benchmarks import harness

    settings = harness.settings(ctx, PARAMS)
    params = {
        **{k: v for k, v in vars(settings).items() if k not in ("folders", "generator")},
        "models": {k: str(v) for k, v in harness.folders(ctx).items()},
        "generator": {k: str(v) for k, v in harness.folders(ctx, "generator").items()},
        "streams": [int(n) for n in settings.streams.split(",")],
        "rounds": ctx.repeat,
    }
    if not params["models"] and not params["generator"]:
        raise SystemExit("error: study=engine_load needs --param folders=NAME=DIR,...")
    groups: dict[tuple, list[dict]] = {}
    for result in measure(params):
        key = (result["model"], result["measurement"], result.get("streams"))
        groups.setdefault(key, []).append(result)
    out = []
    for (model, measurement, streams), results in groups.items():
        details = {k: v for k, v in results[0].items() if k in DETAILS}
        settings_of = {"streams": streams, "prompt": params["prompt"], "output": params["output"]}
        if "cached_prompt_tokens" in results[0]:
            settings_of["cached_prompt_tokens"] = [r["cached_prompt_tokens"] for r in results]
            settings_of["prompt_tokens"] = [r["prompt_tokens"] for r in results]
        variant, params_of = f"{measurement} x{streams}", {**settings_of, **details}
        out += harness.metric_rows(
            ctx, results, UNITS, variant=variant, tool=model, params=params_of
        )
    return out

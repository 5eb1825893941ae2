"""Replicas on Ray Serve: output tok/s and time to first token of `internlm2-graph serve
--replicas R` at S concurrent streams, settings side by side in one run.

    python -m benchmarks run serving --param study=replicas   # cpu: a small model, 1x4 vs 2x8
    python -m benchmarks run serving -e cuda --model 7b -p int4 --param study=replicas \
        devices=0,1 settings=1x64,2x128 prompt=128 output=256          # the 2-GPU goal
    python -m benchmarks run serving --param study=replicas folder=DIR devices=0 \
        settings=1x64,2x64                                             # 2 on one GPU
    python -m benchmarks run serving --param study=replicas "serve_flags=--max-batch-size 64"

A setting RxS is R replicas (the real command, in a subprocess with its own local Ray) driven by
S concurrent streams. On CUDA, R replicas take the first R of --devices, or share them all when
R is larger (2 replicas on `devices=0`: half a GPU each). Each stream sends `requests`
completions back to back (a ~`prompt` token prompt, unique per request, greedy, max_tokens
`output`) through /v1/completions with stream=True; tok/s is the completion tokens of every
request (its usage) over the wall time from the first request to the last reply; time to first
token is per request, from sending to the first text. Rounds alternate the settings' order (ABBA);
"vs first" is, per round, a setting's tok/s over the first setting's, then the median of those.

Replies are exactly `output` tokens (min_tokens: random weights would otherwise end some early
at EOS); the rows count the tokens the server reports (usage), so a short reply would show.

Without `folder`, the study builds `shape` (small: 4 layers of 512) or, with shape=model, the
run's --model at its first precision. Rows per setting: output tok/s, TTFT p50/p99 (medians
over `--repeat` rounds, their spread) and the paired ratio to the first setting.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

# Shapes for the CPU: `small` is big enough that a step costs more than the HTTP around it.
SHAPES = {
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
}
WORDS = [
    "river",
    "stone",
    "light",
    "cloud",
    "field",
    "winter",
    "garden",
    "music",
    "paper",
    "window",
    "story",
    "morning",
]


@dataclass(frozen=True)
class Setting:
    replicas: int
    streams: int

    @property
    def name(self) -> str:
        return f"{self.replicas}x{self.streams}"


def parse_settings(text: str) -> list[Setting]:
    settings = []
    for part in text.split(","):
        found = re.fullmatch(r"(\d+)x(\d+)", part.strip())
        if not found:
            raise SystemExit(f"a setting is REPLICASxSTREAMS, e.g. 2x128: got {part!r}")
        settings.append(Setting(int(found[1]), int(found[2])))
    return settings


def serve_flags(setting: Setting, devices: list[int] | None, extra: str = "") -> list[str]:
    """The command's flags for a setting: placement (module doc), then `extra` as given."""
    flags = [*extra.split(), "--replicas", str(setting.replicas)]
    if devices:
        used = devices[: setting.replicas] if setting.replicas <= len(devices) else devices
        flags += ["--devices", ",".join(map(str, used))]
    return flags


# ----- the server, as users run it -----


class Server:
    """`internlm2-graph serve FOLDER ...` in its own process group, stderr collected."""

    def __init__(self, folder: Path, flags: list[str], startup_s: float):
        self.port = _free_port()
        command = [sys.executable, "-m", "internlm2_graph", "serve", str(folder), *flags]
        command += ["--port", str(self.port), "--model-name", "bench"]
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + startup_s
        while not any("replica(s) on http://" in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not start:\n" + "".join(self.lines[-30:]))
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        """Ctrl-C (drains, stops Ray); the whole group killed if it hangs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- the load -----


def prompts(folder: Path, count: int, tokens: int) -> list[str]:
    """`count` different prompts of about `tokens` tokens (the folder's own tokenizer)."""
    from internlm2_graph.tokenizer import exact_tokenizer

    tokenizer = exact_tokenizer(folder)
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(tokens * 2)]
        text = f"Request {i}: " + " ".join(words)
        ids = tokenizer.encode(text, add_special_tokens=False).ids[: tokens - 1]
        out.append(tokenizer.decode(ids))
    return out


@dataclass
class Reply:
    sent: float
    first: float | None
    done: float
    tokens: int
    prompt_tokens: int
    error: str | None = None


async def _complete(http, url: str, prompt: str, output: int) -> Reply:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": output,
        "min_tokens": output,  # the server's (vLLM's) field: EOS masked, every reply full length
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, usage, error = time.perf_counter(), None, None, None
    async with http.stream("POST", url + "/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode()
            return Reply(sent, None, time.perf_counter(), 0, 0, f"{response.status_code} {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                usage = event["usage"]
            elif first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter()
    done = time.perf_counter()
    if usage is None:
        return Reply(sent, first, done, 0, 0, error or "no usage in the stream")
    return Reply(sent, first, done, usage["completion_tokens"], usage["prompt_tokens"], error)


async def drive(url: str, texts: list[str], streams: int, requests: int, output: int):
    """`streams` clients, each sending `requests` prompts back to back: (replies, wall s)."""
    import httpx

    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:

        async def client(index: int) -> list[Reply]:
            mine = texts[index * requests : (index + 1) * requests]
            return [await _complete(http, url, text, output) for text in mine]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(streams)))
        wall = time.perf_counter() - start
    return [reply for replies in per_client for reply in replies], wall


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ----- one run -----


def measure(params: dict) -> list[dict]:
    """Rows, one per setting and round (module doc). params: folder, settings, devices, prompt,
    output, requests, rounds, warmup, startup_s."""
    folder = Path(params["folder"])
    settings: list[Setting] = params["settings"]
    most = max(s.streams for s in settings) * params["requests"]
    texts = prompts(folder, most, params["prompt"])
    rows = []
    for round_index in range(params["rounds"]):
        order = settings if round_index % 2 == 0 else list(reversed(settings))
        for setting in order:
            flags = serve_flags(setting, params.get("devices"), params.get("serve_flags", ""))
            server = Server(folder, flags, params["startup_s"])
            try:
                warm = texts[: setting.streams]
                asyncio.run(drive(server.url, warm, setting.streams, 1, params["warmup"]))
                load = common.load_average()
                replies, wall = asyncio.run(
                    drive(server.url, texts, setting.streams, params["requests"], params["output"])
                )
            finally:
                server.stop()
            rows.append(_row(setting, round_index, order.index(setting), replies, wall, load))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _row(setting: Setting, round_index: int, position: int, replies, wall, load) -> dict:
    good = [r for r in replies if r.error is None]
    ttft = [(r.first - r.sent) * 1000 for r in good if r.first is not None]
    tokens = sum(r.tokens for r in good)
    return {
        "setting": setting.name,
        "replicas": setting.replicas,
        "streams": setting.streams,
        "round": round_index,
        "position": position,
        "requests": len(replies),
        "errors": len(replies) - len(good),
        "completion_tokens": tokens,
        "prompt_tokens_median": common.median([r.prompt_tokens for r in good]),
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2) if wall else None,
        "ttft_p50_ms": _round(percentile(ttft, 50)),
        "ttft_p99_ms": _round(percentile(ttft, 99)),
        "load_1m": load[0] if load else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ----- the harness's study: `benchmarks run serving --param study=replicas` -----

PARAMS = {
    "folder": "",
    "shape": "small",
    "settings": "1x4,2x8",
    "devices": "",
    "prompt": 128,
    "output": 256,
    "requests": 2,
    "warmup": 8,
    "serve_flags": "",
    "startup_s": 600.0,
}
SMOKE = {"shape": "tiny", "settings": "1x2", "prompt": 8, "output": 4, "requests": 1}


def run(ctx) -> list:
    from benchmarks import harness
    from benchmarks.rows import measured

    common.require_genai()
    args = harness.settings(ctx, PARAMS)
    settings = parse_settings(args.settings)
    params = {
        **vars(args),
        "folder": str(built(ctx, args)),
        "settings": settings,
        "devices": [int(d) for d in args.devices.split(",")] if args.devices else None,
        "rounds": ctx.repeat,
    }
    results = measure(params)
    first, out = settings[0].name, []
    by_round: dict[int, dict] = {}
    for r in results:
        by_round.setdefault(r["round"], {})[r["setting"]] = r
    for setting in settings:
        mine = [r for r in results if r["setting"] == setting.name]
        values = {
            "output_tok_s": [r["output_tok_s"] for r in mine if r["output_tok_s"]],
            "ttft_p50_ms": [r["ttft_p50_ms"] for r in mine if r["ttft_p50_ms"] is not None],
            "ttft_p99_ms": [r["ttft_p99_ms"] for r in mine if r["ttft_p99_ms"] is not None],
            "vs_first": [
                pair[setting.name]["output_tok_s"] / pair[first]["output_tok_s"]
                for pair in by_round.values()
                if setting.name in pair and pair[first]["output_tok_s"]
            ],
        }
        errors = sum(r["errors"] for r in mine)
        for metric, numbers in values.items():
            if numbers:
                unit = {"output_tok_s": "tok/s", "vs_first": "x"}.get(metric, "ms")
                out.append(ctx.row(variant=f"{setting.name} replicas x streams", tool="serve",
                                   metric=metric, unit=unit, params={"errors": errors},
                                   **measured(numbers)))  # fmt: skip
    return out


def built(ctx, args) -> Path:
    """The folder the replicas serve: given, the small shape, or the run's --model."""
    if args.folder:
        return Path(args.folder)
    if args.shape == "model":
        return ctx.build(ctx.precisions[0])
    from internlm2_graph import build
    from internlm2_graph.synthetic import make_config, write_checkpoint

    precision = ctx.precisions[0]
    out = ctx.workdir / "replicas" / f"{args.shape}-{precision}-{ctx.ep}"
    if not (out / "genai_config.json").exists():
        size, extra = ("tiny", SHAPES[args.shape]) if args.shape in SHAPES else (args.shape, {})
        config = make_config(size, max_position_embeddings=4096, **extra)
        source = write_checkpoint(out.parent / f"{args.shape}-ckpt", config, chat=True, seed=1)
        build(source, out, precision, ctx.ep)
        shutil.rmtree(source)
    return out

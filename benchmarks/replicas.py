"""Replicas on Ray Serve: output tok/s and time to first token of `internlm2-graph serve
--replicas R` at S concurrent streams, settings side by side in one run.

    python -m benchmarks.replicas                           # cpu: a small model, 1x4 vs 2x8
    python -m benchmarks.replicas --synthetic 7b --precision int4 --ep cuda \\
        --devices 0,1 --settings 1x64,2x128 --prompt 128 --output 256   # the 2-GPU goal
    python -m benchmarks.replicas --folder DIR --devices 0 --settings 1x64,2x64  # 2 on one GPU
    python -m benchmarks.replicas --serve-flags="--max-batch-size 64" ...  # flags for `serve`

A setting RxS is R replicas (the real command, in a subprocess with its own local Ray) driven by
S concurrent streams. On CUDA, R replicas take the first R of --devices, or share them all when
R is larger (2 replicas on `--devices 0`: half a GPU each). Each stream sends --requests
completions back to back (a ~--prompt token prompt, unique per request, greedy, max_tokens
--output) through /v1/completions with stream=True; tok/s is the completion tokens of every
request (its usage) over the wall time from the first request to the last reply; time to first
token is per request, from sending to the first text. Rounds alternate the settings' order (ABBA);
"vs first" is, per round, a setting's tok/s over the first setting's, then the median of those.

Replies are exactly --output tokens (min_tokens: random weights would otherwise end some early
at EOS); the rows count the tokens the server reports (usage), so a short reply would show.

Results: markdown on stdout and benchmarks/results/replicas-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
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


def run(params: dict) -> list[dict]:
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


# ----- the report -----


def summarize(rows: list[dict], settings: list[Setting]) -> list[list[str]]:
    """Per setting: median tok/s with the spread over rounds, paired ratio to the first, TTFT."""
    first = settings[0].name
    by_round = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["setting"]] = row
    table = []
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting.name]
        rates = [r["output_tok_s"] for r in mine]
        ratios = [
            pair[setting.name]["output_tok_s"] / pair[first]["output_tok_s"]
            for pair in by_round.values()
            if setting.name in pair and first in pair and pair[first]["output_tok_s"]
        ]
        table.append(
            [
                setting.name,
                common.fmt(common.median(rates)),
                f"{min(rates):.1f}-{max(rates):.1f}",
                common.fmt(common.median(ratios), ".2f", "x"),
                f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "",
                common.fmt(common.median([r["ttft_p50_ms"] or 0 for r in mine]), ".0f"),
                common.fmt(common.median([r["ttft_p99_ms"] or 0 for r in mine]), ".0f"),
                str(sum(r["errors"] for r in mine)),
                str(len(mine)),
            ]
        )
    return table


HEADER = [
    "setting (replicas x streams)",
    "output tok/s (median)",
    "spread",
    "vs first (paired median)",
    "spread",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "errors",
    "rounds",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="a built folder (default: build --synthetic)")
    parser.add_argument("--synthetic", default="small", help="tiny, small, 1.8b, 7b or 20b")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--ep", default="cpu")
    parser.add_argument("--settings", default="1x4,2x8", help="REPLICASxSTREAMS,... (1x4,2x8)")
    parser.add_argument("--devices", help="CUDA: GPUs to place replicas on, e.g. 0,1")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (128)")
    parser.add_argument("--output", type=int, default=256, help="max tokens per reply (256)")
    parser.add_argument("--requests", type=int, default=2, help="requests per stream (2)")
    parser.add_argument("--warmup", type=int, default=8, help="tokens of the warm-up replies")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, orders alternating (2)")
    parser.add_argument("--serve-flags", default="", help="more flags for the serve command")
    parser.add_argument("--startup-s", type=float, default=600)
    parser.add_argument("--workdir", default="/tmp/internlm2-bench-replicas")
    parser.add_argument("--keep", action="store_true", help="keep the built folder")
    parser.add_argument("--machine", default=None, help="results name suffix")
    return parser.parse_args(argv)


def _folder(args) -> Path:
    if args.folder:
        return Path(args.folder)
    from internlm2_graph import build
    from internlm2_graph.synthetic import make_config, write_checkpoint

    root = Path(args.workdir)
    out = root / f"{args.synthetic}-{args.precision}-{args.ep}"
    if not (out / "genai_config.json").exists():
        size, extra = (
            ("tiny", SHAPES[args.synthetic]) if args.synthetic in SHAPES else (args.synthetic, {})
        )
        config = make_config(size, max_position_embeddings=4096, **extra)
        checkpoint = write_checkpoint(root / f"{args.synthetic}-ckpt", config, chat=True, seed=1)
        build(checkpoint, out, args.precision, args.ep)
        shutil.rmtree(checkpoint)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.require_genai()
    settings = parse_settings(args.settings)
    devices = [int(d) for d in args.devices.split(",")] if args.devices else None
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), common.load_average()
    folder = _folder(args)
    params = {
        "folder": str(folder),
        "settings": settings,
        "devices": devices,
        "prompt": args.prompt,
        "output": args.output,
        "requests": args.requests,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "startup_s": args.startup_s,
        "serve_flags": args.serve_flags,
    }
    try:
        rows = run(params)
    finally:
        if not args.folder and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    machine = args.machine or common.default_machine_name()
    table = summarize(rows, settings)
    markdown = "\n".join(
        [
            f"# Replicas on Ray Serve ({machine}, {started})",
            "",
            f"`python -m benchmarks.replicas {' '.join(argv or sys.argv[1:])}`",
            "",
            f"model: {args.folder or f'synthetic {args.synthetic} {args.precision} {args.ep}'}; "
            f"prompt ~{args.prompt} tokens, up to {args.output} out, {args.requests} requests "
            f"per stream; load average at start {load_start}",
            "",
            common.markdown_table(HEADER, table),
        ]
    )
    print(markdown)
    payload = {
        "started": started,
        "machine": common.machine_info(),
        "params": {**params, "settings": [s.name for s in settings]},
        "rows": rows,
    }
    common.write_results(f"replicas-{machine}", payload, markdown)


if __name__ == "__main__":
    main()

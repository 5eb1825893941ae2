"""Serving: output tok/s, time to first token and time per output token of `serve`.

`run(params) -> rows`, one flat row per (path, workload, clients, round):
- a closed loop of C clients, each sending its next request when the last one is answered,
  at fixed prompt/output lengths (`fixed`) or lengths drawn from a chat-like distribution
  (`mixed`: log-normal prompt and reply lengths, seeded; generated, nothing downloaded);
- through HTTP (`http`: a real uvicorn server in this process, streamed /v1/completions with
  prompt ids, timed at each server-sent event) or straight on the engine (`engine`:
  EngineBackend.submit, timed at each token event);
- `chat`: one client on og.Generator exactly as `internlm2-graph chat` drives it (the baseline
  for one client's time per output token);
- `og-engine`: og's own static og.Engine (scheduler="engine"; a second copy of the model)
  beside the default scheduler (on the CPU: batched og.Generator, serve/batched.py).
Client counts and paths alternate within each round, so a shared machine's load falls on all.
Output lengths are fixed with min_tokens (eos masked), so random weights cannot end early.

`load(params) -> rows`: the robustness run (1,000 requests from 64 clients, 10% dropped
mid-stream, 5% malformed) against the HTTP server: status counts, answers that differ from
the same greedy prompt answered alone, requests holding a cache afterwards, RSS before/after.

    python -m benchmarks run serving --param folder=FOLDER clients=1,8 prompt=32 gen=64
    python -m benchmarks run serving --param folder=FOLDER load=true
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import numpy as np

DEFAULTS = {
    "clients": [1, 8],
    "paths": ["engine", "http", "chat"],
    "workloads": ["fixed"],
    "prompt_tokens": 32,
    "output_tokens": 64,
    "requests_per_client": 1,
    "rounds": 2,
    "max_batch_size": 16,
    "max_length": 256,  # every path: the KV cache of a static batch is batch x max_length
    "seed": 0,
}


# ----- workloads -----


def fixed_requests(n: int, prompt: int, output: int, rng: random.Random) -> list[tuple]:
    return [([rng.randrange(100, 1000) for _ in range(prompt)], output) for _ in range(n)]


def mixed_requests(n: int, rng: random.Random, scale: float = 1.0) -> list[tuple]:
    """Chat-like lengths: log-normal prompts (median 48 tokens) and replies (median 40),
    clipped to [8, 256] and [8, 128]; `scale` shrinks both for small contexts."""

    def draw(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, rng.lognormvariate(np.log(median * scale), sigma))))

    return [
        ([rng.randrange(100, 1000) for _ in range(draw(48, 0.8, 8, 256))], draw(40, 0.6, 8, 128))
        for _ in range(n)
    ]


def summary(path, workload, clients, round_, records, wall) -> dict:
    """One row: records are (ttft_s, tokens, tpot_s or None) per request."""
    ttft = [r[0] for r in records]
    tpot = [r[2] for r in records if r[2] is not None]
    tokens = sum(r[1] for r in records)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {
        "path": path,
        "workload": workload,
        "clients": clients,
        "round": round_,
        "requests": len(records),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


# ----- the three paths -----


async def _engine_client(backend, queue: list, records: list) -> None:
    from internlm2_graph.serve.engine import Finished, Sampling, Token

    while queue:
        prompt, output = queue.pop()
        start = time.perf_counter()
        times = []
        sampling = Sampling(max_tokens=output, min_tokens=output, do_sample=False)
        async for event in backend.submit(prompt, sampling):
            if isinstance(event, Token):
                times.append(time.perf_counter())
            elif not isinstance(event, Finished):
                raise RuntimeError(event.message)
        records.append(_record(start, times))


def _record(start: float, times: list[float]) -> tuple:
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return (times[0] - start, len(times), tpot)


async def _closed_loop(client, clients: int, requests: list) -> tuple[list, float]:
    queue, records = list(reversed(requests)), []
    start = time.perf_counter()
    await asyncio.gather(*(client(queue, records) for _ in range(clients)))
    return records, time.perf_counter() - start


def run_engine(backend, clients: int, requests: list) -> tuple[list, float]:
    return asyncio.run(_closed_loop(lambda q, r: _engine_client(backend, q, r), clients, requests))


def run_http(url: str, clients: int, requests: list) -> tuple[list, float]:
    import httpx

    async def client(http, queue, records):
        while queue:
            prompt, output = queue.pop()
            body = {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": output,
                "min_tokens": output,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start, times, usage = time.perf_counter(), [], None
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                        times.append(time.perf_counter())
            ttft, _, _ = _record(start, times)
            tokens = usage["completion_tokens"]
            # Events, not tokens: a character's first bytes are held back until it is whole.
            tpot = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
            records.append((ttft, tokens, tpot))

    async def main():
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(timeout=None, limits=limits) as http:
            return await _closed_loop(lambda q, r: client(http, q, r), clients, requests)

    return asyncio.run(main())


def run_chat(model, requests: list, max_length: int) -> tuple[list, float]:
    """og.Generator at batch 1, as internlm2_graph.chat.Chat drives it."""
    import onnxruntime_genai as og

    records, start = [], time.perf_counter()
    for prompt, output in requests:
        params = og.GeneratorParams(model)
        total = len(prompt) + output
        params.set_search_options(max_length=max_length, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        began, times = time.perf_counter(), []
        generator.append_tokens([prompt])
        while len(times) < output:
            generator.generate_next_token()
            int(generator.get_next_tokens()[0])
            times.append(time.perf_counter())
        records.append(_record(began, times))
    return records, time.perf_counter() - start


class Server:
    """The HTTP server in a thread of this process, on an ephemeral port."""

    def __init__(self, backend, name: str = "bench"):
        import uvicorn

        from internlm2_graph.serve.app import create_app

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(backend, name), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        while not self._server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def run(params: dict) -> list[dict]:
    """The closed-loop rows (module doc); params override DEFAULTS, `folder` is required."""
    from internlm2_graph.serve.engine import EngineBackend

    p = {**DEFAULTS, **params}

    def backend_for(scheduler: str) -> EngineBackend:
        return EngineBackend(
            p["folder"],
            max_batch_size=p["max_batch_size"],
            max_length=p["max_length"],
            batch_wait_ms=p.get("batch_wait_ms"),
            scheduler=scheduler,
        )

    backend = backend_for(p.get("scheduler", "auto"))
    # og's own static engine beside the default scheduler (a second copy of the model)
    og_engine = backend_for("engine") if "og-engine" in p["paths"] else None
    server = Server(backend) if "http" in p["paths"] else None
    rows = []
    try:
        for round_ in range(p["rounds"]):
            for workload in p["workloads"]:
                for clients in p["clients"]:
                    rng = random.Random(f"{p['seed']}-{workload}-{clients}")
                    n = clients * p["requests_per_client"]
                    if workload == "fixed":
                        requests = fixed_requests(n, p["prompt_tokens"], p["output_tokens"], rng)
                    else:
                        requests = mixed_requests(n, rng, p.get("mixed_scale", 1.0))
                    for path in p["paths"]:
                        if path == "chat" and clients != 1:
                            continue
                        if path == "engine":
                            records, wall = run_engine(backend, clients, requests)
                        elif path == "og-engine":
                            records, wall = run_engine(og_engine, clients, requests)
                        elif path == "http":
                            records, wall = run_http(server.url, clients, requests)
                        else:
                            records, wall = run_chat(backend.model, requests, p["max_length"])
                        row = summary(path, workload, clients, round_, records, wall)
                        print(_line(row), flush=True)
                        rows.append(row)
    finally:
        if server:
            server.close()
        backend.close()
        if og_engine:
            og_engine.close()
    return rows


def _line(row: dict) -> str:
    tpot = row["tpot_p50_s"]
    return (
        f"{row['path']:6} {row['workload']:5} C={row['clients']:<3} r{row['round']} "
        f"{row['output_tok_s']:7.2f} tok/s  ttft p50 {row['ttft_p50_s']:.2f}s "
        f"p99 {row['ttft_p99_s']:.2f}s  tpot p50 {tpot * 1000 if tpot else 0:.1f}ms"
    )


# ----- the load run -----


def load(params: dict) -> list[dict]:
    """1,000 requests from 64 clients, 10% dropped mid-stream, 5% malformed (module doc)."""
    import httpx
    import psutil

    from internlm2_graph.serve.engine import EngineBackend

    p = {
        "requests": 1000,
        "clients": 64,
        "drop": 0.10,
        "malformed": 0.05,
        "drop_tokens": 1000,  # needs a context of 1,040 tokens or more (tests' tiny: 2,048)
        "seed": 0,
        **params,
    }
    rng = random.Random(p["seed"])
    prompts = [[rng.randrange(100, 1000) for _ in range(rng.randrange(4, 40))] for _ in range(50)]
    kinds = ["drop"] * int(p["requests"] * p["drop"]) + ["bad"] * int(
        p["requests"] * p["malformed"]
    )
    kinds += ["ok"] * (p["requests"] - len(kinds))
    rng.shuffle(kinds)
    plan = [(kind, rng.randrange(len(prompts)), rng.random() < 0.5) for kind in kinds]
    malformed = [
        b"{not json",
        json.dumps({"model": "bench", "messages": [{"role": "robot", "content": "x"}]}).encode(),
        json.dumps({"model": "bench", "prompt": "x", "max_tokens": -3}).encode(),
        json.dumps({"model": "bench", "prompt": "x", "n": 4}).encode(),
        json.dumps({"model": "other", "prompt": "x"}).encode(),
        json.dumps({"model": "bench", "prompt": [10**9]}).encode(),
    ]
    process = psutil.Process()
    backend = EngineBackend(p["folder"], max_batch_size=p.get("max_batch_size", 16))
    server = Server(backend)
    url = server.url

    async def one(http, kind, index, stream, results):
        body = {"model": "bench", "prompt": prompts[index], "max_tokens": 24, "temperature": 0}
        if kind == "bad":
            raw = malformed[index % len(malformed)]
            route = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
            response = await http.post(url + route, content=raw)
            results.append(("bad", response.status_code, None, index))
            return
        if kind == "drop" or stream:
            if kind == "drop":  # long enough that the reply is still running when it leaves
                long = p["drop_tokens"]
                body = {**body, "max_tokens": long, "min_tokens": long}
            async with http.stream(
                "POST", url + "/v1/completions", json={**body, "stream": True}
            ) as response:
                text = ""
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        text += "".join(c["text"] for c in chunk["choices"])
                        if kind == "drop" and text:
                            break  # leaves the stream: the connection closes mid-reply
                status = response.status_code
            results.append((kind, status, None if kind == "drop" else text, index))
            return
        response = await http.post(url + "/v1/completions", json=body)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
        results.append(("ok", response.status_code, text, index))

    async def main():
        results: list = []
        limits = httpx.Limits(max_connections=p["clients"] + 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=None, limits=limits) as http:
            alone = {}
            for index in range(len(prompts)):  # the reference: each prompt answered alone
                body = {"model": "bench", "prompt": prompts[index], "max_tokens": 24}
                response = await http.post(url + "/v1/completions", json={**body, "temperature": 0})
                alone[index] = response.json()["choices"][0]["text"]
            idle_rss = process.memory_info().rss

            async def client(queue, into):
                while queue:
                    await one(http, *queue.pop(), into)

            start = time.perf_counter()
            queue = list(reversed(plan))
            await asyncio.gather(*(client(queue, results) for _ in range(p["clients"])))
            wall = time.perf_counter() - start
            first_rss = process.memory_info().rss
            # The same run again: memory that grows with traffic would grow again here.
            queue, again = list(reversed(plan)), []
            await asyncio.gather(*(client(queue, again) for _ in range(p["clients"])))
        return results, alone, idle_rss, wall, first_rss, again

    try:
        results, alone, idle_rss, wall, first_rss, again = asyncio.run(main())
        deadline = time.monotonic() + 30
        while backend.stats()["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = backend.stats()
        after_rss = process.memory_info().rss
    finally:
        server.close()
        backend.close()
    statuses: dict[str, dict[int, int]] = {}
    for kind, status, _, _ in results:
        statuses.setdefault(kind, {}).setdefault(status, 0)
        statuses[kind][status] += 1
    answered = [(text, index) for kind, status, text, index in results if kind == "ok"]
    row = {
        "requests": len(results),
        "clients": p["clients"],
        "wall_s": wall,
        "statuses": statuses,
        "server_errors_5xx": sum(1 for r in results if r[1] >= 500),
        "well_formed_unanswered": sum(1 for r in results if r[0] == "ok" and r[1] != 200),
        "malformed_not_4xx": sum(1 for r in results if r[0] == "bad" and not 400 <= r[1] < 500),
        "greedy_differing": sum(1 for text, index in answered if text != alone[index]),
        "greedy_compared": len(answered),
        "active_requests_after": after["active_requests"],
        "finished_by_reason": after["finished"],
        "rss_idle_mb": idle_rss / 2**20,
        "rss_after_first_run_mb": first_rss / 2**20,
        "rss_after_second_run_mb": after_rss / 2**20,
        "second_run_5xx": sum(1 for r in again if r[1] >= 500),
        "second_run_greedy_differing": sum(
            1 for kind, _, text, index in again if kind == "ok" and text != alone[index]
        ),
        "note": "RSS is this process's: the server and its 64 clients (httpx) together",
    }
    print(json.dumps(row, indent=1))
    return [row]

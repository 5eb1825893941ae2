"""The model behind the server: one og.Engine, driven by one thread, shared by every request.

`EngineBackend(folder)` owns the og.Model, its tokenizers and the driver thread; the routes
(app.py) only call `prompt_ids`, `submit` and `decoder`. A Ray Serve replica (one per GPU) wraps
the same object, so nothing here knows about HTTP.

og.Engine is not thread-safe and its `run()` blocks for a whole step (it releases the GIL), so
one thread owns it: it begins the turns that were submitted, cancels the ones asked to stop,
runs a step, and hands each event to its turn's asyncio queue. A request's og.Request is closed
as soon as its turn ends, which frees its cache.

Batching: a folder built with a paged-attention graph (CUDA) carries `engine.dynamic_batching`
in genai_config and og.Engine batches continuously. Any other folder batches statically: the
requests begun before a batch's first step run together, and one that arrives later waits for
the whole batch to finish. og 0.18's static engine runs at most 4 together (whatever
`engine.static_batching.max_batch_size` says), so on such folders the default scheduler is
batched og.Generator (batched.py: up to `max_batch_size`), which shares this module's driver
loop, turns and events. Either way, when the driver is idle and a request comes, it waits
`batch_wait_ms` for the next before starting: clients that send together (a closed loop, a
burst) share one batch instead of one request running alone while the rest queue behind it
(measured: 8 clients of the 1.8B int4 without the wait gave 0.85 output tok/s against one
client's 0.91, TTFT p50 202 s, p99 349 s: docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from internlm2_graph.runtime import eos_ids, genai, genai_config, load_model
from internlm2_graph.serve.tools import SpecialIds
from internlm2_graph.tokenizer import exact_tokenizer

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_MS = 20

FINISH_REASONS = {
    "EOS": "stop",
    "STOP_STRING": "stop",
    "CANCELLED": "stop",
    "MAX_GENERATED_TOKENS": "length",
    "MAX_SESSION_TOKENS": "length",
}


class Refused(Exception):
    """A request this engine cannot serve; the message says why (a 4xx for the client)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Sampling:
    """One turn's settings; None keeps the folder's genai_config `search` value."""

    max_tokens: int
    min_tokens: int = 0  # eos ids masked until this many (fixed-length benchmarks)
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    guidance: tuple[str, str] | None = None  # (kind, data): json_schema, regex or lark_grammar


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Finished:
    reason: str  # an og FinishReason name
    generated: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # 400: og refused the turn's settings; 500: the engine failed; 503: stopping


Event = Token | Finished | Failed


class Turn:
    """One request's reply as it is generated: iterate it (async) for Token events, then one
    Finished or Failed. `cancel()` stops it; safe to call at any time, from any task."""

    def __init__(self, driver: _Driver, prompt: list[int], sampling: Sampling):
        self.prompt, self.sampling = prompt, sampling
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False

    def put(self, event: Event) -> None:
        """From the driver thread."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        if not self.done:
            self._driver.inbox.put(("cancel", self))

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        event = await self._events.get()
        if not isinstance(event, Token):
            self.done = True
        return event


class _Driver(threading.Thread):
    """The thread that owns og.Engine (module doc)."""

    def __init__(self, og, model, gather_s: float):
        super().__init__(name="og-engine", daemon=True)
        self.og, self.model, self.gather_s = og, model, gather_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: dict = {}  # og.Request -> (Turn, turn id)
        self.finished: Counter[str] = Counter()  # turns ended, by og FinishReason name
        self.finished_copy: dict[str, int] = {}
        self._flags = og.EngineEventFlags
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.max_batch_size = 0

    def start_engine(self) -> None:
        """Start the thread and wait for its engine (og wants it made in the thread using it)."""
        self.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            self.engine = self.og.Engine(self.model)
            self._buffer = self.engine.create_event_buffer(1024)
            self.max_batch_size = self.engine.get_capabilities().configured_max_batch_size
        except Exception as err:
            self.error = err
            return
        finally:
            self.ready.set()
        while True:
            idle = not self.engine.has_pending_requests()
            message = self.inbox.get() if idle else self._next()
            # A static batch starts with the requests begun before its first step and takes
            # no others until it ends: gather the ones arriving together (module doc).
            gather = idle and self.gather_s > 0
            until = time.monotonic() + 5 * self.gather_s
            while message is not None:
                if message[0] == "stop":
                    self._close_all()
                    return
                self._handle(*message)
                full = len(self.active) >= self.max_batch_size
                wait = min(self.gather_s, until - time.monotonic()) if gather and not full else 0
                message = self._next(wait)
            if self.engine.has_pending_requests():
                try:
                    self._step()
                except Exception as err:  # og raised: fail the batch, keep the server up
                    for request in list(self.active):
                        self._end(request, Failed(f"the engine failed: {err}", 500))

    def _next(self, wait: float = 0):
        try:
            return self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, kind: str, turn: Turn) -> None:
        if kind == "begin":
            self._begin(turn)
            return
        for request, (owner, turn_id) in self.active.items():
            if owner is turn:
                request.cancel_turn(turn_id)
                return

    def _begin(self, turn: Turn) -> None:
        request = self.engine.create_request()
        try:
            turn_id = request.begin_turn(
                np.asarray(turn.prompt, dtype=np.int32), self._options(request, turn.sampling)
            )
        except Exception as err:  # og refuses what this engine cannot do (e.g. a seed)
            request.close()
            turn.put(Failed(str(err), 400))
            return
        self.active[request] = (turn, turn_id)

    def _options(self, request, sampling: Sampling):
        options = self.og.TurnOptions(request)
        options.set_max_generated_tokens(sampling.max_tokens)
        if sampling.min_tokens:
            options.set_min_generated_tokens(sampling.min_tokens)
        if sampling.do_sample is not None:
            options.set_do_sample(sampling.do_sample)
        if sampling.temperature is not None:
            options.set_temperature(sampling.temperature)
        if sampling.top_p is not None:
            options.set_top_p(sampling.top_p)
        if sampling.top_k is not None:
            options.set_top_k(sampling.top_k)
        if sampling.seed is not None:
            options.set_seed(sampling.seed)
        if sampling.guidance is not None:
            options.set_guidance(*sampling.guidance)
        return options

    def _step(self) -> None:
        flags = self._flags
        for event in self.engine.run(self._buffer):
            turn, _ = self.active.get(event.request, (None, None))
            if turn is None:
                continue
            bits = event.flags.value
            if bits & flags.TOKEN.value:
                turn.put(Token(int(event.token)))
            if bits & flags.FAILED.value:
                self._end(event.request, Failed(f"the engine failed: {event.error_code.name}", 500))
            elif bits & flags.TURN_FINISHED.value:
                usage = event.usage
                finished = Finished(
                    event.finish_reason.name, usage.generated_tokens, usage.cached_prompt_tokens
                )
                self._end(event.request, finished)

    def _end(self, request, event: Event) -> None:
        turn, _ = self.active.pop(request)
        request.close()
        self.finished[event.reason if isinstance(event, Finished) else "FAILED"] += 1
        self.finished_copy = dict(self.finished)  # for other threads: replaced, never changed
        turn.put(event)

    def _close_all(self) -> None:
        for request in list(self.active):
            self._end(request, Failed("the server is shutting down", 503))


class EngineBackend:
    """A built folder served by og.Engine (module doc).

    `max_batch_size`: rows of a static batch (folders without a paged graph); None: 16.
    `max_length`: tokens per request (prompt and reply) instead of genai_config's
    search.max_length; a static batch holds a KV cache of max_batch_size * max_length tokens.
    `batch_wait_ms`: before a static batch starts, how long to wait for one more request after
    the last (at most 5 times that in all); None: 20 ms, 0 with continuous batching.
    `scheduler`: `engine` (og.Engine), `generator` (batched og.Generator, batched.py) or
    `auto`: og.Engine for a paged folder, og.Generator batches for the rest (og's static
    engine runs at most 4 requests together).
    """

    def __init__(
        self,
        model_dir: str | Path,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        batch_wait_ms: float | None = None,
        scheduler: str = "auto",
    ):
        og = genai()
        self.model_dir = Path(model_dir)
        config = genai_config(model_dir)
        self.continuous = "dynamic_batching" in config.get("engine", {})
        self.max_length = max_length or int(config["search"]["max_length"])
        self.model = self._load(max_batch_size or DEFAULT_MAX_BATCH_SIZE)
        self.tokenizer = og.Tokenizer(self.model)
        self._encoder = exact_tokenizer(model_dir)
        self.stop_ids = frozenset(eos_ids(model_dir))
        self.vocab_size = int(config["model"]["vocab_size"])
        self.default_do_sample = bool(config["search"].get("do_sample", False))
        self.special_ids = SpecialIds.from_vocabulary(self._encoder.token_to_id)
        self.pad_id = int(config["model"].get("pad_token_id", self.bos_or_eos(config)))
        if batch_wait_ms is None:
            batch_wait_ms = 0 if self.continuous else DEFAULT_BATCH_WAIT_MS
        if scheduler == "auto":
            scheduler = "engine" if self.continuous else "generator"
        self.scheduler = scheduler
        if scheduler == "generator":
            from internlm2_graph.serve.batched import GeneratorDriver

            size = max_batch_size or DEFAULT_MAX_BATCH_SIZE
            self._driver = GeneratorDriver(og, self.model, batch_wait_ms / 1000, size, self)
        else:
            self._driver = _Driver(og, self.model, batch_wait_ms / 1000)
        self._driver.start_engine()
        self.max_batch_size = self._driver.max_batch_size

    @staticmethod
    def bos_or_eos(config: dict) -> int:
        eos = config["model"]["eos_token_id"]
        return eos[0] if isinstance(eos, list) else eos

    def _load(self, max_batch_size: int):
        overlay: dict = {"search": {"max_length": self.max_length}}
        if not self.continuous:
            overlay["engine"] = {"static_batching": {"max_batch_size": max_batch_size}}
        return load_model(self.model_dir, overlay=overlay)

    # Prompts: the folder's chat template, encoded by the exact tokenizer (as `chat` does).
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            json.dumps(messages), add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; add_special_tokens puts <s> first (a plain completion prompt)."""
        return self._encoder.encode(text, add_special_tokens=add_special_tokens).ids

    def decoder(self):
        """A fresh og.TokenizerStream: decode(id) -> the text it completes."""
        return self.tokenizer.create_stream()

    def submit(self, prompt: list[int], sampling: Sampling) -> Turn:
        """Start generating (call from the event loop); iterate the Turn for its events."""
        if len(prompt) >= self.max_length:
            raise Refused(
                f"the prompt is {len(prompt)} tokens and the model's context (max_length) "
                f"{self.max_length}: shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        if len(prompt) + sampling.max_tokens > self.max_length:
            raise Refused(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is "
                f"past the model's context (max_length {self.max_length}): ask for at most "
                f"{self.max_length - len(prompt)} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        sampled = self.default_do_sample if sampling.do_sample is None else sampling.do_sample
        if (
            sampling.seed is not None
            and sampled
            and self.scheduler == "engine"
            and not self.continuous
        ):
            raise Refused(
                "seed needs continuous batching (a paged-attention CUDA folder) or the "
                "generator scheduler; og's static engine takes none: leave seed out, or ask "
                "for greedy output (temperature 0)",
                param="seed",
            )
        if not sampled:
            sampling = replace(sampling, seed=None)  # greedy needs none; static og refuses one
        turn = Turn(self._driver, prompt, sampling)
        self._driver.inbox.put(("begin", turn))
        return turn

    def stats(self) -> dict:
        """Turns holding a cache now (0 when idle: every og.Request was closed) and the turns
        finished so far by og's reason (EOS, MAX_GENERATED_TOKENS, CANCELLED...)."""
        driver = self._driver
        return {"active_requests": len(driver.active), "finished": driver.finished_copy}

    def close(self) -> None:
        self._driver.inbox.put(("stop", None))
        self._driver.join()

"""Static batches on og.Generator, for folders og.Engine batches poorly (the CPU).

og 0.18's static og.Engine runs at most 4 requests together whatever
`engine.static_batching.max_batch_size` says (measured: 12 requests ran as three batches of 4
with max_batch_size 1, 2, 3, 8 or 16), and on a 2-core CPU decode pays for wider batches: it
reads every weight once a step whatever the batch. This driver runs the same turns as
engine.py's, up to `max_batch_size` at a time, through one batched og.Generator:

- prompts right-padded with pad_token_id (og's convention; a left-padded row decodes wrongly)
  and appended at once; og allows no append after that, so a batch takes no newcomer, and a
  request that arrives while one runs waits for the next (as in og's static engine);
- the search options are the generator's, so only turns with the same settings share a batch
  (sampling, seed, guidance; greedy chat requests all do); others wait for a later batch;
- a turn ends for its client at an eos id, at its max_tokens, or when cancelled; its row keeps
  computing until the batch ends (og cannot drop a row), and the batch's KV cache goes with it.
"""

from __future__ import annotations

import numpy as np

from internlm2_graph.serve.engine import Failed, Finished, Token, _Driver


class GeneratorDriver(_Driver):
    """engine.py's driver thread with og.Generator batches in place of og.Engine."""

    def __init__(self, og, model, gather_s: float, max_batch_size: int, backend):
        super().__init__(og, model, gather_s)
        self.max_batch_size = max_batch_size
        self.pad_id, self.stop_ids = backend.pad_id, backend.stop_ids
        self.max_length = backend.max_length
        self.waiting: list = []  # turns not yet in a batch
        self.cancelled: set = set()  # turns of the running batch to cancel

    def run(self) -> None:
        self.ready.set()
        while True:
            message = self.inbox.get() if not self.waiting else self._next()
            until = None
            while message is not None:
                if message[0] == "stop":
                    self._stop()
                    return
                self._take(*message)
                if until is None:
                    until = _now() + 5 * self.gather_s
                full = len(self.waiting) >= self.max_batch_size
                wait = 0 if full else min(self.gather_s, until - _now())
                message = self._next(wait)
            if self.waiting:
                self._run_batch(self._next_batch())

    def _take(self, kind: str, turn) -> None:
        if kind == "begin":
            self.waiting.append(turn)
        elif turn in self.waiting:  # cancelled before it started
            self.waiting.remove(turn)
            self._finish(turn, Finished("CANCELLED", 0, 0))
        else:
            self.cancelled.add(turn)

    def _next_batch(self) -> list:
        key = _settings(self.waiting[0].sampling)
        batch = [t for t in self.waiting if _settings(t.sampling) == key][: self.max_batch_size]
        self.waiting = [t for t in self.waiting if t not in batch]
        return batch

    def _run_batch(self, batch: list) -> None:
        self.cancelled: set = set()
        for turn in batch:
            self.active[turn] = (turn, 0)
        try:
            generator = self._generator(batch)
        except Exception as err:  # og refused the settings (a bad schema, ...)
            for turn in batch:
                self._end(turn, Failed(str(err), 400))
            return
        counts = [0] * len(batch)
        try:
            while self.active and not generator.is_done():
                generator.generate_next_token()
                tokens = generator.get_next_tokens()
                self._between_steps()
                for row, turn in enumerate(batch):
                    if turn not in self.active:
                        continue
                    if turn in self.cancelled:
                        self._end(turn, Finished("CANCELLED", counts[row], 0))
                        continue
                    token = int(tokens[row])
                    counts[row] += 1
                    if token in self.stop_ids:
                        self._end(turn, Finished("EOS", counts[row], 0))
                        continue
                    turn.put(Token(token))
                    if counts[row] >= turn.sampling.max_tokens:
                        self._end(turn, Finished("MAX_GENERATED_TOKENS", counts[row], 0))
        except Exception as err:  # og raised mid-batch: fail it, keep serving
            for turn in list(self.active):
                self._end(turn, Failed(f"the generator failed: {err}", 500))
        for row, turn in enumerate(batch):  # the context is full
            if turn in self.active:
                self._end(turn, Finished("MAX_GENERATED_TOKENS", counts[row], 0))

    def _between_steps(self) -> None:
        """Cancels and newcomers that came during the step (newcomers wait for a batch)."""
        message = self._next()
        while message is not None:
            if message[0] == "stop":
                self.inbox.put(message)  # after this batch
                for turn in list(self.active):
                    self._end(turn, Failed("the server is shutting down", 503))
                return
            self._take(*message)
            message = self._next()

    def _generator(self, batch: list):
        og = self.og
        sampling = batch[0].sampling
        longest = max(len(t.prompt) for t in batch)
        total = min(longest + max(t.sampling.max_tokens for t in batch), self.max_length)
        options = {"batch_size": len(batch), "max_length": total}
        if sampling.min_tokens:
            options["min_length"] = longest + sampling.min_tokens
        for key, value in (
            ("do_sample", sampling.do_sample),
            ("temperature", sampling.temperature),
            ("top_p", sampling.top_p),
            ("top_k", sampling.top_k),
            ("random_seed", sampling.seed),
        ):
            if value is not None:
                options[key] = value
        params = og.GeneratorParams(self.model)
        params.set_search_options(**options)
        if sampling.guidance is not None:
            params.set_guidance(*sampling.guidance)
        generator = og.Generator(self.model, params)
        ids = np.full((len(batch), longest), self.pad_id, dtype=np.int32)
        for row, turn in enumerate(batch):
            ids[row, : len(turn.prompt)] = turn.prompt
        generator.append_tokens(ids)
        return generator

    def _end(self, turn, event) -> None:
        self.active.pop(turn, None)
        self._finish(turn, event)

    def _finish(self, turn, event) -> None:
        self.finished[event.reason if isinstance(event, Finished) else "FAILED"] += 1
        self.finished_copy = dict(self.finished)
        turn.put(event)

    def _stop(self) -> None:
        for turn in self.waiting:
            self._finish(turn, Failed("the server is shutting down", 503))
        self.waiting = []


def _settings(sampling) -> tuple:
    """What a batch's turns must share: the generator's search options and guidance."""
    return (
        sampling.do_sample,
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
        sampling.seed,
        sampling.min_tokens,
        sampling.guidance,
    )


def _now() -> float:
    import time

    return time.monotonic()

"""Chat with a built folder: its chat template, streamed replies, a multi-turn history.

`internlm2-graph chat` (repl) and examples/chat.py are thin users of `Chat`.

- The prompt is rendered by the folder's chat template (og.Tokenizer.apply_chat_template) and
  encoded by the exact tokenizer (tokenizer.exact_tokenizer): SentencePiece's ids, where
  og.Tokenizer's chunking can differ. The rendered text starts with <s>, so no special tokens
  are added. Replies are decoded by og.TokenizerStream, which holds back the first bytes of a
  character until it is complete.
- Sampling is the folder's genai_config `search` section unless the caller overrides it;
  a reply ends on an eos id of genai_config (chat models: </s> and <|im_end|>), at
  `max_new_tokens`, or when the context (search max_length) is full.
- Later turns keep the KV cache: the generator is rewound to the longest prefix of tokens it has
  computed and only the rest is appended (the new user turn and the template's few tokens).
  On a 6-layer, 1024-wide int4 model on 2 shared CPU cores, the third turn's first token
  (about 550 tokens of history) came after 0.09 s, against 2.5 s to encode the history again
  (medians of 3; the second turn's: 0.13 s against 0.86 s);
  on fp32 both ways give the same greedy tokens (int4's prompt and decode kernels round
  differently, so there neither way is the reference). onnxruntime-genai 0.18 computes a
  generated token only when the next one is generated, so a reply's last token is not in the
  cache: appending straight after a reply would skip it (a 0.3 logit error), hence the rewind.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.runtime import eos_ids, genai, genai_config, load_model
from internlm2_graph.speculative import provider_of
from internlm2_graph.tokenizer import exact_tokenizer


class ContextFull(InternLM2GraphError):
    """The conversation no longer fits in the model's max_length."""


def search_options(
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
) -> dict:
    """og search options for the settings given; the folder's genai_config for the rest.

    A temperature, top-p or top-k turns sampling on unless do_sample says otherwise (they
    mean nothing to greedy search), and temperature 0 means greedy, as in ollama and mlx-lm.
    """
    options: dict = {}
    if temperature == 0:
        do_sample, temperature = False if do_sample is None else do_sample, None
    for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        if value is not None:
            options[key] = value
            do_sample = True if do_sample is None else do_sample
    if do_sample is not None:
        options["do_sample"] = do_sample
    if seed is not None:
        options["random_seed"] = seed
    return options


class Chat:
    """A conversation with one built model folder.

    `search`: og search options (search_options()) over the folder's own; `max_new_tokens`
    bounds each reply (None: until an eos id or a full context); `speculative`: off, ngram or
    draft over the folder's own speculative decoding (None: as built).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        system: str | None = None,
        search: dict | None = None,
        max_new_tokens: int | None = None,
        speculative: str | None = None,
    ):
        self._og = genai()
        self.model = load_model(model_dir, speculative)
        self.tokenizer = self._og.Tokenizer(self.model)
        self._encoder = exact_tokenizer(model_dir)
        self.stop_ids = frozenset(eos_ids(model_dir))
        self.search = dict(search or {})
        self.max_length = int(
            self.search.get("max_length", genai_config(model_dir)["search"]["max_length"])
        )
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        # The conversation as the model saw it: prompt ids and its own reply ids (no stop ids).
        self.tokens: list[int] = []
        self._generator = None
        self._cached: list[int] = []  # the ids whose keys and values the generator holds

    def reply(self, text: str, on_text: Callable[[str], None] = lambda piece: None) -> str:
        """Answer `text`, passing each decoded piece to `on_text` as it comes; the reply text.

        A KeyboardInterrupt (Ctrl-C) ends the reply where it is and propagates; what was
        generated until then stays in the history, as the user saw it.
        """
        user = {"role": "user", "content": text}
        prompt = self._prompt_ids(user)
        generator = self._generator_holding(prompt)
        stream = self.tokenizer.create_stream()
        try:
            generated = 0
            while not generator.is_done() and generated != self.max_new_tokens:
                generator.generate_next_token()
                generated += 1
                token = int(generator.get_next_tokens()[0])
                if token in self.stop_ids:
                    break
                on_text(stream.decode(token))
        finally:
            answer = self._record(user, prompt, list(generator.get_sequence(0)))
        return answer

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            json.dumps(messages), add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return self._encoder.encode(text, add_special_tokens=False).ids

    def _prompt_ids(self, user: dict) -> list[int]:
        """The whole conversation up to the new reply, in ids; earlier turns keep their ids."""
        full = self.render([*self.messages, user], add_generation_prompt=True)
        if not self.tokens:
            return self._encode(full)
        # Everything up to the end of the last reply's text is already in self.tokens.
        *before, last_reply = self.messages
        seen = self.render(before, add_generation_prompt=True) + last_reply["content"]
        if full.startswith(seen):
            return self.tokens + self._encode(full[len(seen) :])
        return self._encode(full)  # a template that rewrites earlier turns: encode it all

    def _generator_holding(self, prompt: list[int]):
        """A generator with `prompt` appended, reusing the cached prefix where it can."""
        if len(prompt) >= self.max_length:
            raise ContextFull(
                f"the conversation is {len(prompt)} tokens, the model's max_length "
                f"{self.max_length}: start a new one (/clear), or rebuild the model with "
                "--extra_options max_length=N"
            )
        keep = 0
        if self._generator is not None:
            # At least one token is appended: its logits start the reply.
            keep = min(common_prefix(self._cached, prompt), len(prompt) - 1)
        if keep:
            try:
                self._generator.rewind_to(keep)
            except Exception:  # a runtime or device that cannot rewind: start afresh
                keep = 0
        if not keep:
            params = self._og.GeneratorParams(self.model)
            if self.search:
                params.set_search_options(**self.search)
            self._generator = self._og.Generator(self.model, params)
        self._cached = prompt[:keep]
        self._generator.append_tokens(prompt[keep:])
        self._cached = list(prompt)
        return self._generator

    def _record(self, user: dict, prompt: list[int], sequence: list[int]) -> str:
        reply_ids = sequence[len(prompt) :]
        # The last generated token is not computed until the next is generated (module doc).
        self._cached = sequence[:-1] if reply_ids else sequence
        if reply_ids and reply_ids[-1] in self.stop_ids:
            reply_ids = reply_ids[:-1]
        answer = self.tokenizer.decode(reply_ids) if reply_ids else ""
        self.tokens = prompt + reply_ids
        self.messages += [user, {"role": "assistant", "content": answer}]
        return answer


def default_speculative(folder: str | Path, search: dict | None = None) -> str | None:
    """What `chat` uses when --speculative is not given: ngram for greedy replies from a CPU
    folder that asks for nothing itself (measured: 1.02-1.17x on free writing, 1.3-2x when
    copying); otherwise the folder's own setting (None). Not when sampling: at InternLM2 chat's
    temperature 0.8 / top-p 0.8 lookups are rarely accepted (0.94-1.00x measured). Not on CUDA:
    no measurement yet. `search`: the session's og search options over genai_config's."""
    config = genai_config(folder)  # a one-line error for a folder that is not a built model
    own = "speculative" in config or "draft" in config["model"]
    sampling = {**config["search"], **(search or {})}.get("do_sample", False)
    cpu = provider_of(config["model"]["decoder"]) == "cpu"
    return "ngram" if cpu and not own and not sampling else None


def say(chat: Chat, text: str) -> bool:
    """Stream one reply to stdout; False when Ctrl-C cut it short."""
    try:
        chat.reply(text, lambda piece: print(piece, end="", flush=True))
    except KeyboardInterrupt:
        print(flush=True)
        return False
    print(flush=True)
    return True


def repl(chat: Chat, name: str) -> int:
    """The interactive loop of `internlm2-graph chat`: a line is a message; /clear forgets the
    conversation; /bye, /exit or Ctrl-D ends; Ctrl-C stops a reply. Piped input works too."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"{name}: Ctrl-C stops a reply, Ctrl-D or /bye ends", file=sys.stderr)
    while True:
        try:
            text = input(">>> " if interactive else "").strip()
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye ends the session)", file=sys.stderr)
            continue
        if text in ("/bye", "/exit"):
            return 0
        if text == "/clear":
            chat.clear()
        elif text:
            try:
                say(chat, text)
            except ContextFull as err:
                print(f"error: {err}", file=sys.stderr)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

"""InternLM2's tool calls: OpenAI messages in its chat format, its replies back into `tool_calls`.

The format is InternLM2's own (InternLM's chat_format.md, lmdeploy's internlm2 template):
- the functions go in a system turn of their own, `<|im_start|>system name=<|plugin|>` + their
  JSON, after the first system message;
- the model calls one as `<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}`
  `<|action_end|>` at the end of its reply;
- a result comes back as an `environment name=<|plugin|>` turn.
The folder's chat template writes `'<|im_start|>' + role + '\n' + content`, so the `name=` part
travels in the role and the template (not this module) still renders every turn.

The parser reads token ids, not text: og's decoder drops special tokens, and an id cannot be
faked by text the model writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PLUGIN_SYSTEM_ROLE = "system name=<|plugin|>"
PLUGIN_RESULT_ROLE = "environment name=<|plugin|>"
ACTION_START, ACTION_END, PLUGIN = "<|action_start|>", "<|action_end|>", "<|plugin|>"
# What a forced call's reply starts with: the prompt ends with it and the model writes the JSON.
FORCED_CALL_PREFIX = f"{ACTION_START}{PLUGIN}\n"


def message_text(content) -> str:
    """The text of an OpenAI message content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def render_call(call: dict) -> str:
    """One of an assistant's earlier tool calls, as the model writes it."""
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
    payload = {"name": function["name"], "parameters": parameters}
    return f"{FORCED_CALL_PREFIX}{json.dumps(payload, ensure_ascii=False)}{ACTION_END}"


def template_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI chat messages as the folder's chat template takes them, tools included.

    `messages` are validated dicts (protocol.py); `tools` the functions to offer, or None.
    """
    out = []
    for message in messages:
        role = message["role"]
        content = message_text(message.get("content"))
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        elif role == "tool":
            role = PLUGIN_RESULT_ROLE
        elif role == "assistant":
            content += "".join(render_call(call) for call in message.get("tool_calls") or ())
        out.append({"role": role, "content": content})
    if tools:
        functions = [tool["function"] for tool in tools]
        at = 1 if out and out[0]["role"] == "system" else 0
        out.insert(at, {"role": PLUGIN_SYSTEM_ROLE, "content": json.dumps(functions)})
    return out


def call_schema(functions: list[dict]) -> dict:
    """JSON schema of a call to one of `functions`: what guidance holds a forced call to."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "parameters": function.get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass(frozen=True)
class SpecialIds:
    action_start: int
    action_end: int
    plugin: int

    @classmethod
    def from_vocabulary(cls, token_id: Callable[[str], int | None]) -> SpecialIds | None:
        """The ids of the three tokens, or None for a tokenizer without them (a base model)."""
        ids = [token_id(name) for name in (ACTION_START, ACTION_END, PLUGIN)]
        return None if None in ids else cls(*ids)


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Delta = Content | CallStart | CallArguments

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:parameters|arguments)"\s*:')
_TAIL = re.compile(r"\s*\}\s*$")


class ToolCallParser:
    """A reply's tokens, as they come, into content and tool-call deltas.

    `feed(token, text)` takes one generated id and its decoded text (empty for special ids)
    and returns the deltas it completes; `finish()` the rest. A call's arguments stream as
    the model writes them: everything after `"parameters":` except the object's closing
    brace. A call whose JSON does not start with "name" is sent whole when it ends; text that
    is no call at all (bad JSON, another action such as <|interpreter|>) stays content.
    """

    def __init__(self, ids: SpecialIds | None, in_call: bool = False):
        self.ids = ids
        self.calls = 0
        self._in_call = in_call  # inside <|action_start|><|plugin|> ... <|action_end|>
        self._after_start = False  # just read <|action_start|>, waiting for <|plugin|>
        self._buffer = ""  # the call's text so far
        self._sent = 0  # how much of the arguments went out
        self._name: str | None = None

    def feed(self, token: int, text: str) -> list[Delta]:
        ids = self.ids
        if ids is None:
            return [Content(text)] if text else []
        if self._after_start:
            self._after_start = False
            if token == ids.plugin:
                self._in_call = True
                return []
            return [Content(ACTION_START + text)] if text else [Content(ACTION_START)]
        if token == ids.action_start and not self._in_call:
            self._after_start = True
            return []
        if not self._in_call:
            return [Content(text)] if text else []
        if token == ids.action_end:
            return self._end_call()
        self._buffer += text
        return self._stream_call()

    def finish(self) -> list[Delta]:
        """At the end of the reply: a call cut short (max_tokens) is sent as far as it got."""
        if self._after_start:
            self._after_start = False
            return [Content(ACTION_START)]
        return self._end_call() if self._in_call else []

    def _stream_call(self) -> list[Delta]:
        out: list[Delta] = []
        if self._name is None:
            head = _HEAD.match(self._buffer)
            if head is None:
                return out
            self._name = json.loads(f'"{head.group(1)}"')
            self._buffer = self._buffer[head.end() :]
            out.append(CallStart(self.calls, self._name))
        if not self._sent:  # the arguments start at their first non-space character
            self._buffer = self._buffer.lstrip()
        # Hold back a closing brace (and the spaces around it): it may end the outer object.
        tail = _TAIL.search(self._buffer)
        ready = tail.start() if tail else len(self._buffer)
        if ready > self._sent:
            out.append(CallArguments(self.calls, self._buffer[self._sent : ready]))
            self._sent = ready
        return out

    def _end_call(self) -> list[Delta]:
        self._in_call = False
        buffer, name, sent = self._buffer, self._name, self._sent
        self._buffer, self._name, self._sent = "", None, 0
        index = self.calls
        if name is not None:
            self.calls += 1
            tail = _TAIL.search(buffer)
            rest = buffer[sent : tail.start() if tail else len(buffer)]
            return [CallArguments(index, rest)] if rest else []
        try:
            call = json.loads(buffer)
            name = call["name"]
            arguments = call.get("parameters", call.get("arguments", {}))
        except (ValueError, KeyError, TypeError):
            return [Content(FORCED_CALL_PREFIX + buffer)]
        self.calls += 1
        return [CallStart(index, name), CallArguments(index, json.dumps(arguments))]


def collect(deltas: Iterable[Delta]) -> tuple[str, list[dict]]:
    """A whole reply from its deltas: the content and OpenAI `tool_calls` (ids left out)."""
    content, calls = [], []
    for delta in deltas:
        if isinstance(delta, Content):
            content.append(delta.text)
        elif isinstance(delta, CallStart):
            calls.append({"name": delta.name, "arguments": ""})
        else:
            calls[delta.index]["arguments"] += delta.text
    return "".join(content), calls

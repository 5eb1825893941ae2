"""The OpenAI request bodies this server takes, checked, and OpenAI's error body for the rest.

Fields are OpenAI's. Unknown fields are refused, as OpenAI does, and so are known ones this
server does not serve (`n` > 1, `logprobs`, penalties, `logit_bias`, `echo`...): a client gets
a 400 that names the field rather than an answer that silently ignored it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class OpenAIError(Exception):
    """An error the client gets as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        # Written back into the prompt as InternLM2's call JSON (tools.render_call).
        try:
            parsed = json.loads(value or "{}")
        except ValueError:
            raise ValueError("not JSON: arguments is the call's JSON object, as a string") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return value


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_where_needed(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self


class Function(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(_Strict):
    name: str
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format json_schema needs a json_schema object")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


def _zero_or_none(value: float | None) -> bool:
    return value is None or value == 0


class _Sampling(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; vLLM and others take it
    min_tokens: Annotated[int, Field(ge=0)] = 0  # not OpenAI's either; vLLM's name
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _served(self):
        unserved = {
            "n": self.n not in (None, 1),
            "presence_penalty": not _zero_or_none(self.presence_penalty),
            "frequency_penalty": not _zero_or_none(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        for field, asked in unserved.items():
            if asked:
                raise ValueError(f"{field}: not served here (leave it out)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream true")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _chat_served(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not served here (leave it out)")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice: names a tool call, but no tools are given")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or ()]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r}")
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and self.response_format and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with a forced tool_choice")
        return self

    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # One prompt: text, or token ids (OpenAI takes both; ids skip the tokenizer)
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_served(self):
        if self.echo:
            raise ValueError("echo: not served here (leave it out)")
        if self.logprobs:
            raise ValueError("logprobs: not served here (leave it out)")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not served here (leave it out)")
        if self.suffix:
            raise ValueError("suffix: not served here (leave it out)")
        return self

    def text(self) -> str | list[int]:
        """The prompt's text, or its ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return self.prompt
        return self.prompt[0]


def parse(model: type[BaseModel], body: object):
    """`body` (decoded JSON) as `model`, or an OpenAIError naming the first bad field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unrecognized request argument"
        elif first["type"] == "missing":
            message = "required field missing"
        if not path and ":" in message:  # a check across fields names its field first
            path, message = (part.strip() for part in message.split(":", 1))
        text = f"{path}: {message}" if path else message
        raise OpenAIError(400, text, param=path or None) from None

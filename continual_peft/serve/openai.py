"""OpenAI's completion and chat-completion formats, for runs on a generative backbone.

`model` names a task (that task's slot and prompt template answer) or is "auto" (the router
picks the task per prompt). Decoding is greedy, as `predict` decodes: a request asking for
sampling (`temperature` > 0, `n` > 1) or streaming is refused by name. `max_tokens` cuts the
answer `predict` gives (the run's `generation.max_new_tokens` is the most a task writes;
greedy decoding's first k tokens do not depend on how many follow), and `finish_reason` says
"length" when it cut. A chat request is answered from its last user message, which takes the
place of the task's input (`{text}` in its template); earlier turns and system messages are
not read.

A prompt the router rejects is answered with empty text and `finish_reason` "content_filter"
(OpenAI's value for an answer the server withheld); every choice also carries a
`continual_peft` object: the task that answered, the routing ("router" or "given"), whether
it was rejected, and the checkpoint that answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from continual_peft.serve.served import RequestError, Row

AUTO = "auto"  # the model name that lets the router choose the task


class _Request(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do;
    the ones that would change the answer are checked in `check`."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    n: StrictInt = 1
    stream: bool = False

    def check(self) -> None:
        if self.stream:
            raise RequestError("streaming is not supported; send stream false", "stream", 400)
        if self.n != 1:
            raise RequestError(f"one answer per prompt here, got n={self.n}; send 1", "n", 400)
        if self.temperature:
            raise RequestError(
                f"this server decodes greedily, got temperature {self.temperature}; send 0 or "
                "leave it out",
                "temperature",
                400,
            )


class CompletionRequest(_Request):
    """`POST /v1/completions`: one prompt, or a list of them (one choice each)."""

    prompt: StrictStr | list[StrictStr]

    def rows(self) -> list[Row]:
        self.check()
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [
            Row(text=p, task=task_of(self.model), completion=True, max_tokens=self.max_tokens)
            for p in prompts
        ]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (a list of content parts: its text parts, joined)."""
        if isinstance(self.content, list):
            return "".join(
                str(part.get("text", "")) for part in self.content if part.get("type") == "text"
            )
        return self.content or ""


class ChatRequest(_Request):
    """`POST /v1/chat/completions`: answered from the last user message."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)

    def rows(self) -> list[Row]:
        self.check()
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            raise RequestError("no message with role 'user' to answer", "messages")
        cap = self.max_completion_tokens or self.max_tokens
        return [
            Row(text=users[-1].text(), task=task_of(self.model), completion=True, max_tokens=cap)
        ]


def task_of(model: str) -> str | None:
    """The task a `model` names, None for the router."""
    return None if model == AUTO else model


def _extra(answer: dict, version: str) -> dict:
    return {
        "task": answer["task"],
        "routing": answer["routing"],
        "rejected": answer["rejected"],
        "checkpoint": version,
    }


def _finish(answer: dict) -> str:
    return "content_filter" if answer["rejected"] else answer["finish_reason"]


def _usage(answers: list[dict]) -> dict[str, int]:
    prompt = sum(a["prompt_tokens"] for a in answers)
    completion = sum(a["completion_tokens"] for a in answers)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_response(request: CompletionRequest, answers: list[dict], version: str) -> dict:
    """OpenAI's `text_completion` object for the answered prompts."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": i,
                "text": answer["text"],
                "logprobs": None,
                "finish_reason": _finish(answer),
                "continual_peft": _extra(answer, version),
            }
            for i, answer in enumerate(answers)
        ],
        "usage": _usage(answers),
    }


def chat_response(request: ChatRequest, answers: list[dict], version: str) -> dict:
    """OpenAI's `chat.completion` object for the answered conversation."""
    (answer,) = answers
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer["text"]},
                "finish_reason": _finish(answer),
                "continual_peft": _extra(answer, version),
            }
        ],
        "usage": _usage(answers),
    }


def models_response(tasks: tuple[str, ...], routed: bool, created: float) -> dict:
    """OpenAI's model list: every task, and "auto" when the run has a router."""
    names = ([AUTO] if routed else []) + list(tasks)
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": int(created), "owned_by": "continual-peft"}
            for name in names
        ],
    }


ErrorType = Literal["invalid_request_error", "server_error", "overloaded"]


def error_body(message: str, kind: ErrorType, param: str | None = None, code: str | None = None):
    """OpenAI's error object, which every endpoint of the server answers errors with."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

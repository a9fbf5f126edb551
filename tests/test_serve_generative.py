"""The OpenAI endpoints of `serve` on a generative run (tiny Llama): completions and chat answer
what `predict` answers, for a named task and for "auto" (the router); what the server does not
do is refused by name."""

from __future__ import annotations

import pytest
from helpers import DEVICE, LM_WORDS, lm_word_tasks, require_serve

require_serve()

from fastapi.testclient import TestClient  # noqa: E402

from continual_peft import Backbone, ContinualLearner  # noqa: E402
from continual_peft.backbones.tiny import save_tiny  # noqa: E402
from continual_peft.config import LearnerConfig  # noqa: E402
from continual_peft.engine.evaluation import predict_records  # noqa: E402
from continual_peft.serve.app import create_app  # noqa: E402
from continual_peft.serve.served import Row, load_served  # noqa: E402

PROMPTS = ["fruit of red", "red", "fruit of green", "blue"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative")
    base = save_tiny(root / "base", "llama", LM_WORDS)
    config = LearnerConfig.from_dict(
        {
            "strategy": "per_task",
            "router": "prototype",
            "train": {"epochs": 3, "batch_size": 6, "lr": 2e-2, "warmup": 0.0},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "generation": {"max_new_tokens": 3},
        }
    )
    backbone = Backbone.from_pretrained(str(base), max_length=32, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=config, run_dir=root / "run")
    for task in lm_word_tasks():
        learner.learn(task)
    learner.finish()
    return load_served(root / "run")


def predicted(served, task: str | None) -> list[dict]:
    return predict_records(served.learner, [{"text": p, "task": task} for p in PROMPTS])


@pytest.mark.parametrize("model", ["fruit", "colors", "auto"])
def test_completions_answer_as_predict(served, model):
    want = predicted(served, None if model == "auto" else model)
    with TestClient(create_app(served)) as client:
        response = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == model
    for choice, row in zip(body["choices"], want, strict=True):
        assert choice["text"] == (row["label"] or "")
        assert choice["continual_peft"]["task"] == row["task"]
        assert choice["continual_peft"]["checkpoint"] == served.version
        assert choice["finish_reason"] == ("content_filter" if row["rejected"] else "stop")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_answers_the_last_user_message(served):
    (want,) = predict_records(served.learner, [{"text": "fruit of blue", "task": "fruit"}])
    messages = [
        {"role": "system", "content": "You answer."},
        {"role": "user", "content": "fruit of red"},
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": [{"type": "text", "text": "fruit of blue"}]},
    ]
    with TestClient(create_app(served)) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "fruit", "messages": messages}
        )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want["label"]}


def test_max_tokens_cuts_the_answer(served):
    row = Row(text="red", task="fruit", completion=True, max_tokens=2)
    answer = {"task": "fruit", "label": "red blue green", "rejected": False, "routing": "given"}
    cut = served._finished(row, answer)
    assert (cut["text"], cut["completion_tokens"], cut["finish_reason"]) == (
        "red blue",
        2,
        "length",
    )
    whole = served._finished(Row(text="red", task="fruit", completion=True, max_tokens=3), answer)
    assert (whole["text"], whole["finish_reason"]) == ("red blue green", "stop")


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "red"}, 404, "'nope' is not a task"),
        ("/v1/completions", {"model": "fruit", "prompt": "red", "stream": True}, 400, "stream"),
        ("/v1/completions", {"model": "fruit", "prompt": "red", "n": 2}, 400, "n=2"),
        ("/v1/completions", {"model": "fruit", "prompt": "a", "temperature": 0.7}, 400, "greedily"),
        ("/v1/completions", {"model": "fruit", "prompt": ""}, 422, "are empty"),
        ("/v1/completions", {"model": "fruit", "prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"prompt": "red"}, 422, "model: Field required"),
        ("/v1/chat/completions", {"model": "fruit", "messages": []}, 422, "messages"),
        (
            "/v1/chat/completions",
            {"model": "fruit", "messages": [{"role": "system", "content": "hi"}]},
            422,
            "no message with role 'user'",
        ),
    ],
)
def test_what_the_server_does_not_do_is_refused(served, path, body, status, says):
    with TestClient(create_app(served)) as client:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    if status == 404:
        assert response.json()["error"]["code"] == "model_not_found"

"""`continual-peft serve`: answers equal `predict`'s, dynamic batching, a full queue, errors that
stay with their request, bad input, start-up errors, SIGTERM draining, and tasks a running `run`
adds picked up without a restart (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import FinishedRun, require_serve

require_serve()

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from continual_peft.cli import app as cli  # noqa: E402
from continual_peft.engine.evaluation import predict_records  # noqa: E402
from continual_peft.engine.loading import load_learner  # noqa: E402
from continual_peft.errors import ContinualPeftError  # noqa: E402
from continual_peft.serve.app import ServeSettings, create_app  # noqa: E402
from continual_peft.serve.batching import Batcher, BatchSettings, Overloaded  # noqa: E402
from continual_peft.serve.served import RequestError, Row, load_served  # noqa: E402
from continual_peft.serve.server import bind  # noqa: E402

TEXTS = ["red blue", "cat", "green", "dog bird", "yellow red", "fish", "blue", "horse cat"]
CLI = [sys.executable, "-m", "continual_peft"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def served(finished_run: FinishedRun):
    return load_served(finished_run.run)


@pytest.fixture(scope="module")
def expected(finished_run: FinishedRun) -> list[dict]:
    """What `predict` answers for TEXTS: routed, and as the second task (given)."""
    learner = load_learner(finished_run.run)
    records = [{"text": t} for t in TEXTS] + [{"text": t, "task": "animals"} for t in TEXTS]
    return predict_records(learner, records)


def same_answer(got: dict, want: dict) -> None:
    assert {k: got[k] for k in ("task", "label", "rejected", "routing")} == {
        k: want[k] for k in ("task", "label", "rejected", "routing")
    }
    if "score" in want:  # batched with other rows: equal up to float rounding
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)


# ---------------------------------------------------------------- answers and batching


def test_concurrent_requests_share_forwards_and_answer_as_predict(served, expected):
    settings = ServeSettings(batching=BatchSettings(wait_ms=300, max_rows=64))
    with TestClient(create_app(served, settings)) as client:
        bodies = [{"texts": [t]} for t in TEXTS] + [
            {"texts": [t], "task": "animals"} for t in TEXTS
        ]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
        metrics = client.get("/metrics").text
    for response, want in zip(answers, expected, strict=True):
        assert response.status_code == 200, response.text
        (got,) = response.json()["predictions"]
        same_answer(got, want)
        assert response.json()["checkpoint"] == served.version
    batches = _metric(metrics, "continual_peft_batch_rows_count")
    assert _metric(metrics, "continual_peft_batch_rows_sum") == len(bodies)
    assert batches < len(bodies)  # requests arriving together shared a forward
    routed = sum(1 for w in expected[: len(TEXTS)] if not w["rejected"])
    counted = sum(
        value
        for line, value in _metric_lines(metrics, "continual_peft_rows_total")
        if 'routing="router"' in line
    )
    assert counted == routed


def test_one_request_mixing_tasks_and_the_router(served, expected):
    tasks = [None] * len(TEXTS) + ["animals"] * len(TEXTS)
    with TestClient(create_app(served)) as client:
        response = client.post("/predict", json={"texts": TEXTS * 2, "tasks": tasks})
    assert response.status_code == 200, response.text
    for got, want in zip(response.json()["predictions"], expected, strict=True):
        same_answer(got, want)


def test_an_error_of_one_request_leaves_its_batch_alone(served, expected):
    """A task unknown to the run that answers (one switched in after the request was
    admitted) fails that request only."""
    answers = served.answer([[Row(text=TEXTS[0])], [Row(text="x", task="gone")], []])
    (first,), refused, empty = answers
    same_answer(first, expected[0])
    assert isinstance(refused, RequestError) and refused.status == 404
    assert "unknown task(s) ['gone']" in str(refused)
    assert empty == []


def test_an_input_the_backbone_refuses_fails_its_request_alone(served, expected):
    """The batch's pass fails on one request's text: each request is answered alone."""
    good, bad, also = served.answer(
        [[Row(text=TEXTS[0])], [Row(text="red \udc00")], [Row(text=TEXTS[1])]]
    )
    same_answer(good[0], expected[0])
    same_answer(also[0], expected[1])
    assert isinstance(bad, RequestError) and bad.status == 422
    assert "not valid Unicode" in str(bad)


def patched(served, **methods):
    """A copy of a served run with some methods replaced (the original stays as it is)."""
    copy = type(served).__new__(type(served))
    copy.__dict__.update(served.__dict__)
    for name, method in methods.items():
        object.__setattr__(copy, name, method)
    return copy


def test_a_failed_pass_is_answered_request_by_request(served, expected):
    def together(requests):
        if any(row.text == "boom" for rows in requests for row in rows):
            raise ContinualPeftError("input 'boom' refused by the backbone")
        return served._together(requests)

    failing = patched(served, _together=together)
    good, bad, also = failing.answer(
        [[Row(text=TEXTS[0])], [Row(text="boom")], [Row(text=TEXTS[1])]]
    )
    same_answer(good[0], expected[0])
    same_answer(also[0], expected[1])
    assert isinstance(bad, RequestError) and bad.status == 422 and "'boom' refused" in str(bad)


def test_a_surrogate_is_refused_before_it_joins_a_batch(served):
    body = b'{"texts": ["red \\udc00"]}'
    settings = ServeSettings(batching=BatchSettings(wait_ms=300))
    with TestClient(create_app(served, settings)) as client, ThreadPoolExecutor(4) as pool:
        good = [pool.submit(client.post, "/predict", json={"texts": ["red"]}) for _ in range(3)]
        bad = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert [f.result().status_code for f in good] == [200, 200, 200]
    assert bad.status_code == 422 and "not valid Unicode" in bad.json()["error"]["message"]


def test_a_server_failure_is_a_counted_500(served):
    def broken(requests):
        raise RuntimeError("out of memory")

    with TestClient(create_app(patched(served, answer=broken))) as client:
        response = client.post("/predict", json={"texts": ["red"]})
        metrics = client.get("/metrics").text
    assert response.status_code == 500
    assert "RuntimeError: out of memory" in response.json()["error"]["message"]
    assert 'continual_peft_requests_total{endpoint="/predict",status="500"} 1.0' in metrics


def test_a_full_queue_is_refused_with_retry_after():
    release = threading.Event()

    def work(model, requests):
        release.wait(timeout=30)
        return [len(rows) for rows in requests]

    async def scenario():
        batcher = Batcher(None, work, BatchSettings(wait_ms=0, max_rows=2, max_queue=4))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1, 2]))  # in the worker, blocked
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit([1, 2])) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit([1])
        release.set()
        answers = await asyncio.gather(first, *queued)
        await batcher.drain()
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.submit([1])
        return refused.value, answers

    refused, answers = asyncio.run(scenario())
    assert refused.retry_after >= 1 and "4 rows waiting, at most 4" in str(refused)
    assert answers == [2, 2, 2]


def test_the_app_answers_503_with_retry_after_when_full(served):
    release = threading.Event()
    original = served.answer

    def slow(requests):
        release.wait(timeout=30)
        return original(requests)

    settings = ServeSettings(
        batching=BatchSettings(wait_ms=0, max_rows=1, max_queue=2), max_texts=2
    )
    gated = patched(served, answer=slow)
    with TestClient(create_app(gated, settings)) as client, ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(client.post, "/predict", json={"texts": ["red"]}) for _ in range(3)]
        time.sleep(0.5)  # one in the worker, two queued: the queue is full
        refused = client.post("/predict", json={"texts": ["red"]})
        release.set()
        assert all(f.result().status_code == 200 for f in waiting)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "the queue is full" in refused.json()["error"]["message"]


# ---------------------------------------------------------------- endpoints and bad input


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not a JSON object"),
        (b"[1, 2]", 400, "not a JSON object"),
        (b'{"texts": [1, "a"]}', 422, "texts.0: Input should be a valid string"),
        (b'{"texts": "a text"}', 422, "texts: Input should be a valid list"),
        (b'{"text": ["a"]}', 422, "texts: Field required; text: Extra inputs"),
        (b'{"texts": []}', 422, "no texts given"),
        (b'{"texts": ["red", "  "]}', 422, "text(s) [1] are empty"),
        ('{"texts": ["red", "\u200b\u0301", "\ue000"]}'.encode(), 422, "[1, 2] hold nothing"),
        (b'{"texts": ["red"], "task": "nope"}', 404, "unknown task(s) ['nope']"),
        (b'{"texts": ["red"], "tasks": ["colors", null]}', 422, "tasks has 2 entries for 1"),
        (b'{"texts": ["red"], "task": "colors", "tasks": ["colors"]}', 422, "not both"),
        (json.dumps({"texts": ["red"] * 300}).encode(), 413, "300 texts in one request"),
        (json.dumps({"texts": ["red " * 300_000]}).encode(), 413, "over the limit"),
    ],
)
def test_bad_requests_get_clear_answers(served, body, status, says):
    with TestClient(create_app(served)) as client:
        response = client.post(
            "/predict", content=body, headers={"content-type": "application/json"}
        )
        after = client.post("/predict", json={"texts": ["red"]})
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert after.status_code == 200  # the server stays up for everyone else


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "says"),
    [
        ("GET", "/nowhere", {}, 404, "the endpoints are"),
        ("GET", "/predict", {}, 405, "Method Not Allowed"),
        ("POST", "/predict", {"content-encoding": "gzip"}, 415, "send the body uncompressed"),
        ("POST", "/v1/completions", {"content-type": "application/json"}, 400, '"prompt"'),
    ],
)
def test_every_error_is_the_same_envelope(served, method, path, headers, status, says):
    with TestClient(create_app(served)) as client:
        response = client.request(method, path, content=b"[]", headers=headers)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_refused(served):
    def chunks():
        for _ in range(64):
            yield b" " * 32_768

    with TestClient(create_app(served)) as client:
        response = client.post("/predict", content=chunks())
    assert response.status_code == 413


def test_tasks_health_models_and_metrics(served):
    with TestClient(create_app(served)) as client:
        tasks = client.get("/tasks").json()
        health = client.get("/health")
        assert client.head("/health").status_code == 200  # load balancers ask with HEAD
        models = client.get("/v1/models").json()
        client.post("/predict", json={"texts": ["red"]})
        metrics = client.get("/metrics")
        completion = client.post("/v1/completions", json={"model": "auto", "prompt": "red"})
    assert [t["name"] for t in tasks["tasks"]] == ["colors", "animals"]
    assert tasks["checkpoint"] == served.version and tasks["router"] == "prototype"
    assert tasks["router_layers"] == served.learner.router.layers
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m["id"] for m in models["data"]] == ["auto", "colors", "animals"]
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'continual_peft_requests_total{endpoint="/predict",status="200"} 1.0' in metrics.text
    assert completion.status_code == 404 and "use POST /predict" in completion.text


def _metric_lines(text: str, name: str) -> list[tuple[str, float]]:
    return [
        (line, float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    ]


def _metric(text: str, name: str) -> float:
    (found,) = [v for line, v in _metric_lines(text, name) if line.split(" ")[0] == name]
    return found


# ---------------------------------------------------------------- start-up errors


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ContinualPeftError, match="--max-queue 8: give at least --max-batch"):
        ServeSettings(batching=BatchSettings(max_rows=16, max_queue=8))
    with pytest.raises(ContinualPeftError, match="--poll 0"):
        ServeSettings(poll_seconds=0)


def test_start_up_errors_name_the_problem(tmp_path, run_copy):
    runner = CliRunner()
    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        in_use = runner.invoke(cli, ["serve", str(run_copy), "--port", str(port)])
    finally:
        taken.close()
    assert in_use.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in in_use.stderr

    level = runner.invoke(cli, ["serve", str(run_copy), "--log-level", "loud", "--port", "0"])
    assert level.exit_code == 2 and "--log-level 'loud': choose one of critical" in level.stderr

    (tmp_path / "a-file").write_text("x")
    a_file = runner.invoke(cli, ["serve", str(tmp_path / "a-file"), "--port", "0"])
    assert a_file.exit_code == 2 and "is a file, not a run directory" in a_file.stderr

    (tmp_path / "fresh").mkdir()
    fresh = runner.invoke(cli, ["serve", str(tmp_path / "fresh"), "--port", "0"])
    assert fresh.exit_code == 2 and "not a run directory" in fresh.stderr

    heads = sorted(run_copy.glob("tasks/*/head.safetensors")) or sorted(
        run_copy.glob("tasks/*/*.safetensors")
    )
    heads[0].write_bytes(b"damaged")
    damaged = runner.invoke(cli, ["serve", str(run_copy), "--port", "0"])
    assert damaged.exit_code == 2, damaged.output
    assert heads[0].name in damaged.stderr and "--resume" in damaged.stderr
    assert "Traceback" not in damaged.output


def test_the_watcher_picks_up_only_the_same_run(run_copy):
    from continual_peft.serve.served import RunWatcher

    watcher = RunWatcher(load_served(run_copy))
    checkpoint = run_copy / "checkpoint.json"
    original = checkpoint.read_text(encoding="utf-8")
    assert watcher.poll() is False and watcher.failed is None

    data = json.loads(original)
    data["written"] = "later"  # the same run, a newer checkpoint
    checkpoint.write_text(json.dumps(data), encoding="utf-8")
    assert watcher.poll() is True

    watcher.refuse("OSError: a file was being replaced", retry_seconds=0.2)  # a failed load
    assert watcher.poll() is False and watcher.failed.startswith("OSError")
    time.sleep(0.3)
    assert watcher.poll() is True  # tried again once the wait is over

    data["run_config_sha256"] = "0" * 64  # another run's checkpoint in the folder
    checkpoint.write_text(json.dumps(data), encoding="utf-8")
    assert watcher.poll() is False and "now holds another run" in watcher.failed

    data = json.loads(original)
    data["tasks"][0]["data_sha256"] = "1" * 64  # the same configuration, other data
    checkpoint.write_text(json.dumps(data), encoding="utf-8")
    assert watcher.poll() is False and "now holds another run" in watcher.failed

    checkpoint.unlink()
    assert watcher.poll() is False and "checkpoint.json is missing" in watcher.failed
    checkpoint.write_text(original, encoding="utf-8")
    assert watcher.poll() is False and watcher.failed is None


# ---------------------------------------------------------------- real processes


class Served:
    """A `continual-peft serve` process on a free port."""

    def __init__(self, run: Path, *options: str) -> None:
        command = [*CLI, "serve", str(run), "--port", "0", "--threads", "1", *options]
        self.process = subprocess.Popen(
            command, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if " at http://" in line:
                threading.Thread(target=self._drain_stderr, daemon=True).start()
                return line.rsplit(" at ", 1)[1].strip()
        raise AssertionError(f"the server did not start: {''.join(self.lines)}")

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def test_sigterm_answers_the_requests_in_flight_then_exits_0(finished_run):
    server = Served(finished_run.run, "--batch-wait-ms", "10000")
    try:
        with ThreadPoolExecutor(3) as pool:
            pending = [
                pool.submit(httpx.post, f"{server.url}/predict", json={"texts": [t]}, timeout=60)
                for t in TEXTS[:3]
            ]
            time.sleep(1.0)  # received, waiting in a 10 s batching window
            stopped = time.monotonic()
            code = server.stop()
            answers = [f.result() for f in pending]
            drained = time.monotonic() - stopped
    finally:
        server.process.kill()
    assert code == 0, "".join(server.lines)
    assert drained < 8  # the window was cut short, not waited out
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(len(a.json()["predictions"]) == 1 for a in answers)


def test_a_client_that_hangs_up_costs_no_forward(finished_run):
    server = Served(finished_run.run, "--batch-wait-ms", "1500")
    try:
        with pytest.raises(httpx.TimeoutException):  # the client leaves while it waits
            httpx.post(f"{server.url}/predict", json={"texts": TEXTS}, timeout=0.5)
        time.sleep(2.0)  # the window ends with nobody left in it
        answered = httpx.post(f"{server.url}/predict", json={"texts": ["red"]}, timeout=60)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert server.stop() == 0
    finally:
        server.process.kill()
    assert answered.status_code == 200
    assert _metric(metrics, "continual_peft_batch_rows_sum") == 1  # only the request that stayed
    assert 'continual_peft_requests_total{endpoint="/predict",status="499"} 1.0' in metrics


def test_tasks_a_running_run_adds_are_picked_up_between_batches(finished_run, tmp_path):
    run = tmp_path / "run"
    learn = subprocess.Popen(
        [
            *CLI,
            "run",
            str(finished_run.spec),
            "--out",
            str(run),
            "--backbone",
            str(finished_run.base),
            "--router",
            "prototype",
            "--epochs",
            "2",
            "--max-length",
            "32",
            "--baseline",
            "none",
            "--threads",
            "1",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.json").is_file():
            assert learn.poll() is None, learn.stderr.read() if learn.stderr else ""
            assert time.monotonic() < deadline, "the run wrote no checkpoint"
            time.sleep(0.05)
        learn.send_signal(signal.SIGSTOP)  # hold the run after its first task
        server = Served(run, "--poll", "0.2")
        first = httpx.get(f"{server.url}/tasks").json()
        seen: list[tuple[str, int]] = []
        stop = threading.Event()

        def ask() -> None:  # one client, asking without a pause while the run learns
            while not stop.is_set():
                response = httpx.post(f"{server.url}/predict", json={"texts": TEXTS}, timeout=60)
                seen.append((response.json().get("checkpoint"), response.status_code))

        asking = threading.Thread(target=ask)
        asking.start()
        learn.send_signal(signal.SIGCONT)
        assert learn.wait(timeout=240) == 0, learn.stderr.read() if learn.stderr else ""
        deadline = time.monotonic() + 60
        while (now := httpx.get(f"{server.url}/tasks").json())["status"] != "finished":
            assert time.monotonic() < deadline, now
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        asking.join(timeout=60)
        second = httpx.post(f"{server.url}/predict", json={"texts": ["cat"], "task": "animals"})
        assert server.stop() == 0
    finally:
        if learn.poll() is None:
            learn.send_signal(signal.SIGCONT)
            learn.kill()
        if server is not None:
            server.process.kill()
    assert [t["name"] for t in first["tasks"]] == ["colors"] and first["status"] == "running"
    assert [t["name"] for t in now["tasks"]] == ["colors", "animals"] and now["switches"] >= 1
    assert second.status_code == 200 and second.json()["predictions"][0]["task"] == "animals"
    assert seen and all(status == 200 for _, status in seen)  # none dropped
    versions = [version for version, _ in seen]
    assert versions[0] == first["checkpoint"] and versions[-1] == now["checkpoint"]
    order = list(dict.fromkeys(versions))  # each version answered one stretch, never again
    assert [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]] == order

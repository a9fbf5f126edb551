"""The server's Prometheus metrics (`GET /metrics`, with `prometheus_client`).

Each app keeps its own registry, so two servers in one process (tests) count apart.

    continual_peft_requests_total{endpoint, status}     answered requests by HTTP status
    continual_peft_request_seconds{endpoint}            latency, arrival to answer (histogram)
    continual_peft_batch_rows                           rows per routed forward (histogram)
    continual_peft_batch_seconds                        seconds per routed forward (histogram)
    continual_peft_rows_total{task, routing}            answered rows by task and routing
                                                        ("router" or "given")
    continual_peft_rejected_rows_total                  rows the router rejected
    continual_peft_queue_rows                           rows waiting now
    continual_peft_tasks                                tasks of the checkpoint served
    continual_peft_checkpoint_switches_total            newer checkpoints picked up
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """The collectors of one server, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "continual_peft_requests", "Answered requests.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "continual_peft_request_seconds",
            "Seconds from a request's arrival to its answer.",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "continual_peft_batch_rows",
            "Rows per routed forward.",
            buckets=ROWS_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "continual_peft_batch_seconds",
            "Seconds per routed forward.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "continual_peft_rows",
            "Answered rows by task and routing.",
            ["task", "routing"],
            registry=r,
        )
        self.rejected = Counter(
            "continual_peft_rejected_rows", "Rows the router rejected.", registry=r
        )
        self.queue_rows = Gauge("continual_peft_queue_rows", "Rows waiting now.", registry=r)
        self.tasks = Gauge("continual_peft_tasks", "Tasks of the checkpoint served.", registry=r)
        self.switches = Counter(
            "continual_peft_checkpoint_switches", "Newer checkpoints picked up.", registry=r
        )

    def batch(self, rows: int, seconds: float) -> None:
        """Count one routed forward."""
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def answered(self, answers: list[dict]) -> None:
        """Count a request's answered rows by task and routing, and its rejections."""
        for answer in answers:
            if answer.get("rejected"):
                self.rejected.inc()
            else:
                self.rows.labels(task=answer["task"], routing=answer["routing"]).inc()

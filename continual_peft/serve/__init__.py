"""Serving a learned run over HTTP (the optional `serve` extra: FastAPI, uvicorn and
prometheus_client): dynamic batching into one routed forward, OpenAI-format endpoints for
generative backbones, and newer checkpoints of a run still learning picked up between batches.

    served.py    the loaded run, its checkpoint version, and a batch answered as `predict` does
    batching.py  the bounded queue and the window that groups requests into one forward
    openai.py    OpenAI's completion, chat and model-list formats
    metrics.py   the Prometheus metrics
    app.py       the FastAPI app (endpoints, errors, the body limit, the checkpoint watcher)
    server.py    bind, load, run uvicorn, drain on SIGTERM
"""

"""The `continual-peft` command line. Each command parses options and calls one library function.

Every command is registered here, in the order `--help` lists them; `base` holds what they
share, `train`, `use`, `show` and `serve` the commands.
"""

from continual_peft.cli import serve, show, train, use
from continual_peft.cli.base import app, main

app.callback()(main)
app.command(short_help="Learn a stream of tasks; checkpoints and a report after each.")(train.run)
app.command("compare", short_help="Run several strategies on one stream; write a leaderboard.")(
    train.compare_
)
app.command(short_help="Print a run's report, a grid's aggregate or a leaderboard.")(show.report)
app.command(short_help="Export one task's module and head (peft adapter or merged model).")(
    use.export
)
app.command(short_help="Predict task and label per input (the router's or a given task).")(
    use.predict
)
app.command("eval", short_help="Score a trained run on labelled data, without training.")(use.eval_)
app.command(short_help="Serve a run over HTTP: predictions, OpenAI endpoints, metrics.")(
    serve.serve
)
app.command("list", short_help="List module kinds, strategies, routers or shipped streams.")(
    show.list_
)

__all__ = ["app"]

"""Learn three small tasks one after another with the library, then predict and read the report.

Run: python examples/library_quickstart.py  (bundled all-MiniLM-L6-v2; about a minute on CPU)
"""

from rich.console import Console

from continual_peft import ContinualLearner, Task, TrainConfig


def make_task(name: str, pairs: dict[str, list[str]]) -> Task:
    """A task from hand-written examples per label; every third one is held out for testing."""
    rows = [(text, label) for label, texts in pairs.items() for text in texts]
    return Task.from_examples(name, train=rows[0::3] + rows[1::3], test=rows[2::3])


weather = make_task(
    "weather",
    {
        "sunny": ["clear skies all day", "bright sunshine and warm", "not a cloud in the sky"] * 4,
        "rainy": ["heavy showers this afternoon", "bring an umbrella, it pours", "wet and drizzly"]
        * 4,
    },
)
orders = make_task(
    "orders",
    {
        "refund": ["I want my money back", "please refund my order", "return this and refund me"]
        * 4,
        "track": ["where is my parcel", "has my order shipped yet", "tracking number please"] * 4,
    },
)

learner = ContinualLearner(strategy="per_task", train=TrainConfig(epochs=5, batch_size=8))
for task in (weather, orders):
    learner.learn(task)  # a fresh LoRA slot and head per task; earlier ones stay frozen

print(learner.predict(["it is pouring outside", "send me a refund"], task=["weather", "orders"]))
Console().print(learner.report["metrics"]["oracle"])

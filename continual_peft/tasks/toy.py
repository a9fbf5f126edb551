"""A toy generative stream: small word-mapping tasks a tiny random LM with LoRA can learn.

Every task maps the same six colour words to its own answer ("fruit of red" -> "apple",
"animal of red" -> "fox"), its cue word in every input so a router can tell the tasks apart.
One module shared across the tasks is asked for conflicting answers about the same colours, so
it forgets; a module per task does not. Inputs are a few phrasings of (cue, colour), and the
test split repeats phrasings seen in training: it measures whether the mapping is still known.

`TOY_WORDS` lists every word the stream uses (inputs, targets and template), for
`continual_peft.backbones.tiny.word_tokenizer(TOY_WORDS)`. The spec that ships in the package,
`continual_peft/data/demo/generative.toml`, and its JSONL files are what
`write_toy_generative_stream(<that folder>, spec_name="generative.toml")` writes (a test keeps
them equal).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.generation import GENERATION
from continual_peft.tasks.streams import Stream
from continual_peft.tasks.task import Task

TOY_TEMPLATE = "Input: {text} Output:"
TOY_KEYS = ("red", "yellow", "green", "blue", "black", "white")
# task (its cue word) -> the answer for each of TOY_KEYS, in order
TOY_TASKS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "lime", "blueberry", "blackberry", "coconut"),
    "animal": ("fox", "canary", "frog", "whale", "crow", "swan"),
    "vehicle": ("fire truck", "school bus", "tractor", "police car", "limousine", "ambulance"),
    "gem": ("ruby", "topaz", "emerald", "sapphire", "onyx", "pearl"),
}
TOY_PHRASES = ("{cue} of {key}", "the {key} {cue}", "name the {key} {cue}")
TOY_WORDS: list[str] = sorted(
    {word for answers in TOY_TASKS.values() for answer in answers for word in answer.split()}
    | set(TOY_TASKS)
    | set(TOY_KEYS)
    | {word for phrase in TOY_PHRASES for word in phrase.split() if "{" not in word}
    | {"Input", "Output"}
)


def toy_generative_stream(
    num_tasks: int = 3, train_per_task: int = 48, test_per_task: int = 24, seed: int = 0
) -> Stream:
    """The first `num_tasks` of the toy tasks (fruit, animal, vehicle, gem), as generation
    tasks with the template "Input: {text} Output:".

    Args:
        num_tasks: How many tasks, 1 to 4.
        train_per_task: Training examples per task; every colour as often as the count allows.
        test_per_task: Test examples per task, likewise.
        seed: Which phrasings and order; the same seed gives the same stream.
    """
    if not 1 <= num_tasks <= len(TOY_TASKS):
        raise ContinualPeftError(
            f"num_tasks = {num_tasks}: the toy generative stream has 1 to {len(TOY_TASKS)} "
            f"tasks ({', '.join(TOY_TASKS)})."
        )
    for key, count in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if count < 1:
            raise ContinualPeftError(f"{key} = {count}: give at least one example per task.")
    names = list(TOY_TASKS)[:num_tasks]
    return Stream(
        name="toy-generative",
        tasks=[_toy_task(cue, train_per_task, test_per_task, seed) for cue in names],
        description=(
            "Each task maps the same colour words to its own answer "
            f"({', '.join(names)}), so a shared module forgets."
        ),
        source="toy_generative_stream",
        orders={"default": names},
    )


def _toy_task(cue: str, train_size: int, test_size: int, seed: int) -> Task:
    """One toy task: seeded phrasings of its cue and each colour, and the colour's answer."""
    rng = random.Random(f"toy-{seed}-{cue}")
    answers = dict(zip(TOY_KEYS, TOY_TASKS[cue], strict=True))
    splits = []
    for size in (train_size, test_size):
        keys = [TOY_KEYS[i % len(TOY_KEYS)] for i in range(size)]
        rng.shuffle(keys)
        phrases = [rng.choice(TOY_PHRASES).format(cue=cue, key=key) for key in keys]
        splits.append([(phrase, answers[key]) for phrase, key in zip(phrases, keys, strict=True)])
    return Task.from_examples(
        cue,
        *splits,
        description=f"colour -> {cue}",
        kind=GENERATION,
        template=TOY_TEMPLATE,
    )


def write_toy_generative_stream(
    folder: str | Path, spec_name: str = "stream.toml", **sizes: int
) -> Path:
    """Write `toy_generative_stream(**sizes)` as a stream spec and JSONL files under `folder`
    (`<task>/train.jsonl`, `<task>/test.jsonl` and the spec `spec_name`), for the command line;
    returns the spec's path. `load_stream` of it gives the same tasks."""
    folder = Path(folder)
    stream = toy_generative_stream(**sizes)
    lines = [
        f"name = {json.dumps(stream.name)}",
        f"description = {json.dumps(stream.description)}",
        f"template = {json.dumps(TOY_TEMPLATE)}",
    ]
    for task in stream.tasks:
        (folder / task.name).mkdir(parents=True, exist_ok=True)
        for split, inputs, ids in (
            ("train", task.train_inputs, task.train_labels),
            ("test", task.test_inputs, task.test_labels),
        ):
            pairs = zip(inputs, ids, strict=True)
            rows = [{"prompt": x, "target": task.labels[y]} for x, y in pairs]
            text = "".join(json.dumps(row) + "\n" for row in rows)
            (folder / task.name / f"{split}.jsonl").write_text(text, encoding="utf-8", newline="\n")
        lines += [
            "",
            "[[tasks]]",
            f"name = {json.dumps(task.name)}",
            f'kind = "{GENERATION}"',
            f'train = "{task.name}/train.jsonl"',
            f'test = "{task.name}/test.jsonl"',
            f"description = {json.dumps(task.description)}",
        ]
    spec = folder / spec_name
    spec.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    return spec

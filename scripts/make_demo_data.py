"""Generate the demo stream shipped inside the package at ``continual_peft/data/demo/``.

Every text is made here from hand-written vocabulary and sentence templates, combined with a
seeded ``random.Random``; nothing is downloaded. Re-running the script rewrites every file
byte-identically.

Three tasks label the *same kind* of customer-support message by different attributes (product,
intent, mood); the other two attributes in each message are random distractors. A single shared
adapter trained on them in turn has to re-purpose the same tokens, so it forgets; per-task adapters
do not. A fourth task (news-headline topic) comes from a different domain.

Run from the repository root:

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 1729
TRAIN_SIZE = 300  # per task, split evenly over labels
TEST_SIZE = 100  # per task, split evenly over labels (rounded down)
OUT_DIR = Path(__file__).resolve().parent.parent / "continual_peft" / "data" / "demo"

Sampler = Callable[[random.Random, str], str]

# ---------------------------------------------------------------- support messages: vocabulary

PRODUCTS: dict[str, list[str]] = {
    "phone": [
        "my phone",
        "the smartphone",
        "my new handset",
        "this mobile",
        "the cell phone",
        "my mobile",
        "the phone I ordered",
        "the handset",
        "my smartphone",
    ],
    "laptop": [
        "my laptop",
        "the notebook computer",
        "this laptop",
        "the ultrabook",
        "my new notebook",
        "the computer I ordered",
        "the laptop",
        "my work computer",
    ],
    "headphones": [
        "my headphones",
        "the earbuds",
        "this headset",
        "the wireless earphones",
        "my new earbuds",
        "the over-ear headphones",
        "the headphones I ordered",
        "my earphones",
    ],
    "smartwatch": [
        "my smartwatch",
        "the fitness watch",
        "this smart watch",
        "the wrist tracker",
        "my new watch",
        "the activity band",
        "the watch I ordered",
        "my fitness band",
    ],
}

INTENTS: dict[str, list[str]] = {
    "refund": [
        "I want a refund for {p}.",
        "please refund {p}, I am sending it back.",
        "can I get my money back for {p}?",
        "I returned {p} and still have not been paid back.",
        "I expect the full price of {p} back on my card.",
        "credit my account for {p}, I do not want it anymore.",
        "how do I get reimbursed for {p}?",
        "I would like my money returned for {p}.",
    ],
    "repair": [
        "{p} stopped working, can you fix it?",
        "I need {p} repaired under warranty.",
        "the screen on {p} is cracked and needs fixing.",
        "can a technician look at {p}?",
        "{p} will not charge anymore, please repair it.",
        "how do I send {p} in for service?",
        "{p} keeps crashing and needs to be fixed.",
        "please replace the broken part in {p}.",
    ],
    "delivery status": [
        "where is {p}? It still has not arrived.",
        "when will {p} be delivered?",
        "the tracking for {p} has not updated in days.",
        "has {p} shipped yet?",
        "{p} was supposed to arrive on Monday.",
        "can you tell me where {p} is right now?",
        "I am still waiting for {p} to show up.",
        "the courier never brought {p}, what is the status?",
    ],
    "cancel order": [
        "please cancel my order for {p}.",
        "I changed my mind, cancel {p}.",
        "stop the order for {p} before it ships.",
        "I no longer want {p}, call it off.",
        "can you cancel {p}? I ordered it by mistake.",
        "cancel the purchase of {p} please.",
        "do not send {p}, I am cancelling.",
        "I need to withdraw my order for {p}.",
    ],
}

MOODS: dict[str, list[str]] = {
    "angry": [
        "This is absolutely unacceptable!",
        "I am furious.",
        "Worst service ever.",
        "I am sick of waiting on you people.",
        "Sort this out now or I am done with you.",
        "Honestly, what a joke.",
        "I am really fed up.",
        "This is outrageous!",
        "Do not make me ask again.",
        "I have had enough of this.",
    ],
    "calm": [
        "No rush.",
        "Whenever you get a chance.",
        "Just letting you know.",
        "A reply at your convenience is fine.",
        "Thanks in advance.",
        "I understand these things happen.",
        "Let me know when you can.",
        "It is not urgent.",
        "Take your time.",
        "Just wanted to check.",
    ],
    "happy": [
        "I love your store!",
        "You have always been great to me.",
        "I am really happy with everything else.",
        "Great service so far :)",
        "Thanks so much, you are the best!",
        "I am a big fan of your shop.",
        "Your team was wonderful last time!",
        "Have a lovely day!",
        "Really pleased with you overall.",
        "Keep up the amazing work!",
    ],
}

GREETINGS = ["", "", "Hi!", "Hello.", "Hello team!", "Hey there.", "Good morning.", "Hi again."]

FILLERS = [
    "I ordered it last week.",
    "My order number is {n}.",
    "I bought it as a gift.",
    "It was a birthday present.",
    "I paid with my credit card.",
    "Order #{n}.",
    "I am a long-time customer.",
    "It was on sale.",
    "I live abroad at the moment.",
    "My account email is the same as usual.",
    "I got it from your website.",
]

# Past events that name another intent, so the intent task cannot key on "refund" or "cancel".
PAST_INTENTS: dict[str, list[str]] = {
    "refund": ["Last time you refunded me within a day.", "I got my money back quickly before."],
    "repair": ["You repaired my old one without any issues.", "The last fix you did held up well."],
    "delivery status": ["My previous order was delivered fast.", "Shipping used to be quick."],
    "cancel order": ["I have never cancelled an order before.", "I almost cancelled, but did not."],
}

# A second product mentioned in passing, so the product task cannot key on any product word.
SIDE_MENTIONS = [
    "I also have {p} from you and that one is fine.",
    "{p} from you works great, though.",
    "I already own {p} from your shop.",
    "My partner bought {p} at the same time.",
]

# ---------------------------------------------------------------- news headlines: vocabulary

# Subjects and objects name the topic; verbs are shared by all topics. A few words ("record",
# "deal", "race", "title") appear under more than one topic so no single keyword decides.
HEADLINES: dict[str, tuple[list[str], list[str]]] = {
    "sports": (
        [
            "City United",
            "The national rugby team",
            "Veteran striker",
            "Rookie quarterback",
            "The home side",
            "The defending champion",
            "Relay squad",
            "The league leader",
            "Star goalkeeper",
            "The underdog club",
        ],
        [
            "the cup final",
            "a record transfer",
            "the relay title",
            "the world championship",
            "a new stadium",
            "the derby",
            "the season opener",
            "a doping ban",
            "the Olympic trials",
            "the race for the title",
        ],
    ),
    "politics": (
        [
            "The prime minister",
            "Opposition leader",
            "The Senate",
            "Parliament",
            "The governor",
            "Ruling party",
            "The election commission",
            "The foreign minister",
            "City council",
            "The president",
        ],
        [
            "the budget vote",
            "a trade deal",
            "the leadership race",
            "the snap election",
            "a tax reform bill",
            "the coalition talks",
            "a no-confidence motion",
            "the new cabinet",
            "the voting reform",
            "the border treaty",
        ],
    ),
    "science": (
        [
            "NASA",
            "A research team",
            "The space agency",
            "A physics institute",
            "A team of biologists",
            "An observatory",
            "A climate institute",
            "The lab",
            "The geological survey",
            "A university study",
        ],
        [
            "a Mars probe",
            "the genome project",
            "a record fusion experiment",
            "the vaccine trial",
            "a quantum chip",
            "the telescope survey",
            "a new species find",
            "the climate model",
            "the particle collider run",
            "an asteroid sample",
        ],
    ),
    "business": (
        [
            "Tech giant",
            "The central bank",
            "The carmaker",
            "A retail chain",
            "A major investor",
            "The airline",
            "An oil producer",
            "A startup",
            "The bank",
            "The shareholder group",
        ],
        [
            "a merger deal",
            "record profits",
            "the bond sale",
            "a share buyback",
            "the quarterly forecast",
            "an interest rate cut",
            "the takeover race",
            "a product recall",
            "the stock listing",
            "mass layoffs",
        ],
    ),
}

VERBS = [
    "wins",
    "loses",
    "announces",
    "unveils",
    "delays",
    "backs",
    "celebrates",
    "faces questions over",
    "signs off on",
    "prepares for",
    "reacts to",
    "pulls out of",
]

# Used instead of the topic's own subject some of the time, so the object must carry the topic.
NEUTRAL_SUBJECTS = [
    "The committee",
    "A spokesperson",
    "An insider",
    "The organiser",
    "A local group",
    "The panel",
    "A new report",
    "The review board",
]

# A second, subordinate story from another topic: the main clause decides, the mention distracts.
LINKERS = ["ahead of", "days after", "despite", "amid talk of", "overshadowed by", "weeks before"]

PREFIXES = ["", "", "", "Breaking: ", "Analysis: ", "Live: ", "Report: ", "Update: "]
# Tails borrow other topics' flavour on purpose: they are distractors, not topic evidence.
SUFFIXES = [
    "",
    ", sources say",
    " after long delay",
    " in surprise move",
    " this week",
    ", officials confirm",
    " amid criticism",
    " for the first time",
    " as fans look on",
    " as investors watch",
    " ahead of the election",
    ", new data show",
    " as markets wobble",
    " before the big match",
    " in a landmark study",
]


@dataclass(frozen=True)
class TaskSpec:
    """One task of the demo stream: its name, label order and how to draw a text for a label."""

    name: str  # folder name and stream task name
    description: str  # one line, copied into stream.toml
    labels: list[str]  # fixed label order written to labels.json
    sample: Sampler  # draws one text for a given label


def _sentence(text: str) -> str:
    """Capitalise the first letter, since templates may start with a lower-case product phrase."""
    return text[0].upper() + text[1:]


def support_message(rng: random.Random, product: str, intent: str, mood: str) -> str:
    """Build one support message from independent product, intent and mood slots."""
    request = _sentence(rng.choice(INTENTS[intent]).format(p=rng.choice(PRODUCTS[product])))
    body = [request]
    if rng.random() < 0.6:
        body.append(rng.choice(FILLERS).format(n=rng.randint(10000, 99999)))
    if rng.random() < 0.4:
        other = rng.choice([i for i in INTENTS if i != intent])
        body.append(rng.choice(PAST_INTENTS[other]))
    if rng.random() < 0.4:
        other = rng.choice([p for p in PRODUCTS if p != product])
        body.append(_sentence(rng.choice(SIDE_MENTIONS).format(p=rng.choice(PRODUCTS[other]))))
    rng.shuffle(body)
    # Mood sits before or after the request so position says nothing about the label.
    mood_line = rng.choice(MOODS[mood])
    parts = [mood_line, *body] if rng.random() < 0.5 else [*body, mood_line]
    greeting = rng.choice(GREETINGS)
    return " ".join([greeting, *parts] if greeting else parts)


def support_sampler(attribute: str) -> Sampler:
    """Return a sampler that fixes one attribute to the label and draws the other two at random."""
    slots = {"product": PRODUCTS, "intent": INTENTS, "mood": MOODS}

    def sample(rng: random.Random, label: str) -> str:
        values = {name: rng.choice(list(vocab)) for name, vocab in slots.items()}
        values[attribute] = label
        return support_message(rng, **values)

    return sample


def news_headline(rng: random.Random, topic: str) -> str:
    """Build one headline: subject, shared verb, topical object, and random framing."""
    subjects, objects = HEADLINES[topic]
    # The object decides the topic; the subject is often neutral or borrowed from another topic
    # ("Tech giant unveils a quantum chip" is science), so it is only weak evidence.
    draw = rng.random()
    if draw < 0.45:
        subject = rng.choice(subjects)
    elif draw < 0.75:
        subject = rng.choice(NEUTRAL_SUBJECTS)
    else:
        subject = rng.choice(HEADLINES[rng.choice([t for t in HEADLINES if t != topic])][0])
    core = f"{subject} {rng.choice(VERBS)} {rng.choice(objects)}"
    if rng.random() < 0.5:
        other = rng.choice([t for t in HEADLINES if t != topic])
        core += f" {rng.choice(LINKERS)} {rng.choice(HEADLINES[other][1])}"
        return f"{rng.choice(PREFIXES)}{core}"
    return f"{rng.choice(PREFIXES)}{core}{rng.choice(SUFFIXES)}"


# Listed in training order. Two attribute tasks on the same messages come back to back, the
# off-domain task shifts the shared adapter further, and the third attribute task comes last.
TASKS = [
    TaskSpec(
        "support-product",
        "Customer-support messages: which product is the message about.",
        list(PRODUCTS),
        support_sampler("product"),
    ),
    TaskSpec(
        "support-intent",
        "Customer-support messages: what does the customer want.",
        list(INTENTS),
        support_sampler("intent"),
    ),
    TaskSpec("news-topic", "News headlines: topic of the story.", list(HEADLINES), news_headline),
    TaskSpec(
        "support-mood",
        "Customer-support messages: the customer's mood.",
        list(MOODS),
        support_sampler("mood"),
    ),
]


def make_split(spec: TaskSpec, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Draw distinct texts per label and split them, so no text is in both train and test."""
    n_train, n_test = TRAIN_SIZE // len(spec.labels), TEST_SIZE // len(spec.labels)
    seen: set[str] = set()
    train: list[dict] = []
    test: list[dict] = []
    for label in spec.labels:
        texts: list[str] = []
        for _ in range(100 * (n_train + n_test)):
            if len(texts) == n_train + n_test:
                break
            text = spec.sample(rng, label)
            if text not in seen:
                seen.add(text)
                texts.append(text)
        else:
            raise RuntimeError(f"task {spec.name!r}: too few distinct texts for label {label!r}")
        train += [{"text": t, "label": label} for t in texts[:n_train]]
        test += [{"text": t, "label": label} for t in texts[n_train:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line with a stable key order and Unix newlines."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="utf-8", newline="\n")


def stream_toml(tasks: list[TaskSpec]) -> str:
    """Render stream.toml; json.dumps quoting is valid TOML for these plain strings."""
    lines = [
        'name = "demo"',
        'description = "Four template-made text tasks; three label the same support messages '
        'by different attributes, so a shared adapter forgets."',
        'data_root = "."',
        f"order = {json.dumps([spec.name for spec in tasks])}",
    ]
    for spec in tasks:
        lines += [
            "",
            "[[tasks]]",
            f"name = {json.dumps(spec.name)}",
            f'train = "{spec.name}/train.jsonl"',
            f'test = "{spec.name}/test.jsonl"',
            f'labels = "{spec.name}/labels.json"',
            f"description = {json.dumps(spec.description)}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Regenerate every file of the demo stream."""
    for index, spec in enumerate(TASKS):
        # One generator per task, seeded by position, so editing one task leaves the others as-is.
        train, test = make_split(spec, random.Random(SEED + index))
        folder = OUT_DIR / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "train.jsonl", train)
        write_jsonl(folder / "test.jsonl", test)
        labels_json = json.dumps(spec.labels, ensure_ascii=False, indent=2) + "\n"
        (folder / "labels.json").write_text(labels_json, encoding="utf-8", newline="\n")
        print(f"{spec.name}: {len(train)} train, {len(test)} test, labels {spec.labels}")
    (OUT_DIR / "stream.toml").write_text(stream_toml(TASKS), encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()

"""Tasks and streams: a task's records and labels, where they are read from (JSONL, CSV,
Hugging Face datasets), class splits, and streams described by spec files.

`from continual_peft.tasks import Task` (and the names below) is the import path for them."""

from continual_peft.tasks.class_split import class_split
from continual_peft.tasks.streams import Stream, load_stream
from continual_peft.tasks.task import Task, load_task

__all__ = ["Stream", "Task", "class_split", "load_stream", "load_task"]

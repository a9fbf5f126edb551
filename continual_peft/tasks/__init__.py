"""Tasks and streams: a task's records and labels, where they are read from (JSONL, CSV,
Hugging Face datasets), class splits, and streams described by spec files."""

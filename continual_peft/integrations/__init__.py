"""Integrations with other tools: export a task's module for peft, run an Avalanche
benchmark through the learner."""

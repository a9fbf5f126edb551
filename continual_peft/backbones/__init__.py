"""Backbones: the frozen transformer (text or image), where it runs and in which precision,
the one place that loads a model, and the fingerprint that ties a run to its weights."""

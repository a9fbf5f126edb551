"""The backbone check: a saved run or export is only used with the backbone it was trained on.

A run records its backbone's fingerprint in `config.json` (an export, in `continual_peft.json`):
the model class, a hash of its config and a hash of a few weight tensors (`Backbone.fingerprint`).
Slots and heads trained on one backbone are meaningless on another, and often still load without
a shape error (same architecture, other weights), so a mismatch is refused before anything runs.
"""

from __future__ import annotations

import hashlib

from continual_peft.backbones.text import Backbone
from continual_peft.errors import ContinualPeftError

# What must agree, with the words a message uses for it. The name may differ (a moved folder).
CHECKED = {
    "model_class": "model class",
    "config_sha256": "config",
    "weights_sha256": "weights",
    "layers_sha256": "layer weights",  # runs written before it have none: not checked there
}


def describe(fingerprint: dict) -> str:
    """One line naming a backbone: its name, class and hashes."""
    name = fingerprint.get("name") or "?"
    facts = ", ".join(f"{word} {fingerprint.get(key, '?')}" for key, word in CHECKED.items())
    return f"{name!r} ({facts})"


def check_fingerprint(saved: dict, backbone: Backbone, where: str) -> None:
    """Refuse `backbone` unless it is the one whose fingerprint `saved` holds.

    Keys that `saved` lacks (files written before a key existed) are not checked.

    Args:
        saved: The recorded fingerprint: name, model_class, config_sha256, weights_sha256.
        backbone: The backbone about to be used.
        where: What recorded `saved`, for the message (e.g. "run runs/x").

    Raises:
        ContinualPeftError: Naming both backbones, what differs and what to do.
    """
    now = {"name": backbone.name, **backbone.fingerprint()}
    check_quantization(saved, now, where)
    differ = [
        word
        for key, word in CHECKED.items()
        if saved.get(key)
        and saved[key] != now[key]
        and not (key == "config_sha256" and saved[key] == full_config_sha256(backbone))
    ]
    if not differ:
        return
    wanted = saved.get("name") or "the original model"
    raise ContinualPeftError(
        f"{where} was trained on backbone {describe(saved)}, but the backbone given is "
        f"{describe(now)} (mismatch: {', '.join(differ)}). Its modules and heads only fit "
        f"the backbone they were trained on: use {wanted!r} (pass it as backbone=... or "
        "--backbone)."
    )


def check_quantization(saved: dict, now: dict, where: str) -> None:
    """Refuse a backbone whose linear weights are stored otherwise than in the run (full
    precision vs 8-bit vs 4-bit, or other 4-bit settings), naming both. A fingerprint written
    before quantization existed is of a full-precision backbone. Checked before the weights:
    a quantized backbone's hashes are read otherwise (`text._source_hashes`)."""
    ran, given = saved.get("quantization") or "none", now.get("quantization") or "none"
    if ran == given:
        return
    name = saved.get("name") or "the original model"
    setting = ran.split(" ", 1)[0]
    raise ContinualPeftError(
        f"{where} was trained on backbone {name!r} quantized {_words(ran)}, but the backbone "
        f"given is quantized {_words(given)}. Its modules were trained against those frozen "
        f"weights: load the backbone with the run's quantization (quantize = {setting!r}, "
        "as the run's config.json records it; a run's own commands load it so)."
    )


def _words(quantization: str) -> str:
    return "none (full precision)" if quantization == "none" else quantization


def full_config_sha256(backbone: Backbone) -> str:
    """The hash of the model's whole config, volatile keys included: how fingerprints of format-1
    run directories name the model (a format-1 run records it; it is accepted as the same
    model)."""
    text = backbone.model.config.to_json_string(use_diff=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

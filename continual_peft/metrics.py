"""Continual-learning metrics as pure functions of the accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training task ``i``. Code indexes from 0; the
formulas in :data:`METRIC_DEFINITIONS` (copied into every report) index from 1, as in the papers.
Entries that were not measured are NaN: everything above the diagonal, except the superdiagonal
``R[j-1, j]``, which the engine measures just before training task ``j`` for forward transfer;
and under a re-evaluation schedule (`config.EvaluationConfig`) old tasks' entries of the rows
in between. The diagonal is always measured. A metric that needs an entry not measured is
``None``; forgetting's peak is taken over the entries measured.

Metrics that need at least two tasks return ``None`` for a single task rather than NaN or 0, so a
report never shows a made-up number.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from continual_peft.errors import ContinualPeftError

METRIC_DEFINITIONS: dict[str, str] = {
    "R": (
        "R[i, j] = accuracy on the test set of task j after training task i "
        "(T tasks trained so far, indices 1-based); entries not measured are left blank."
    ),
    "b": (
        "b[j] = accuracy on task j with its untrained head on the bare frozen backbone (no "
        "module; a fresh zero-initialised slot gives the same output), measured before training "
        "task j: what no training at all would give (the forward-transfer baseline)."
    ),
    "acc": (
        "ACC = mean_j R[T, j]: average accuracy over all tasks after the last task (blank while "
        "an entry of that row is not measured)."
    ),
    "avg_incremental_acc": (
        "Average incremental accuracy = mean_i mean_{j<=i} R[i, j]: ACC after every task, "
        "averaged (over the rows i whose every entry was measured)."
    ),
    "bwt": (
        "BWT = 1/(T-1) * sum_{j<T} (R[T, j] - R[j, j]) (Lopez-Paz & Ranzato 2017); "
        "negative means later tasks hurt earlier ones. Undefined (blank) for T = 1 or while an "
        "R[T, j] is not measured."
    ),
    "fwt": (
        "FWT = 1/(T-1) * sum_{j>1} (R[j-1, j] - b[j]): accuracy on task j just before training "
        "it, relative to b[j]. Undefined (blank) for T = 1 or when an R[j-1, j] or b[j] was not "
        "measured."
    ),
    "forgetting": (
        "F = 1/(T-1) * sum_{j<T} (max_{l<T} R[l, j] - R[T, j]) (Chaudhry et al. 2018), where the "
        "max runs over rows l = j..T-1, i.e. only after task j was trained, that measured task j "
        "(R[j, j] always is). Undefined (blank) for T = 1 or while an R[T, j] is not measured."
    ),
    "avalanche_forgetting": (
        "Avalanche forgetting, per task j < T: R[j, j] - R[T, j] (= minus the per-task BWT term); "
        "blank for the last task and where R[T, j] is not measured. Reported under this name for "
        "interoperability with Avalanche."
    ),
    "routing": (
        "R under 'oracle' gives each input its own task's slot and head; R under 'routed' lets the "
        "router choose from the frozen features. A routed prediction is correct when its label "
        "STRING equals the true label, so a row sent to another task with the same label wording "
        "(e.g. Amazon vs Yelp stars) can still be right; a rejected row is wrong."
    ),
    "dev": (
        "dev ACC = mean over tasks of the oracle accuracy on each task's dev split after the "
        "last task: a split carved from the training data (seeded, stratified by label) or "
        "given, never the test set. A comparison that has it on every entry ranks by it and "
        "chooses a sweep's setting on it; the ACC beside it is that choice's test score."
    ),
    "rejection": (
        "Rejected[i, j] = share of task j's test inputs the router turned away after training "
        "task i: a known task's false rejects. reject_rate promises at most that share on new "
        "inputs (split-conformal: each task's threshold is set on held-out training inputs the "
        "router's statistics never saw, and recomputed after every task). Routed ACC counts a "
        "rejected row wrong; 'routed ACC, accepted rows' is the routed metric over the rows "
        "the router accepted."
    ),
    "routing_accuracy": (
        "Routing accuracy[i, j] = share of task j's test inputs whose top-1 routed task is j, "
        "after training task i. Routed ACC / oracle ACC compares the two final ACCs."
    ),
}


def _as_matrix(R: ArrayLike) -> np.ndarray:
    """Convert ``R`` to a float matrix (``None`` becomes NaN) and check what every metric needs:
    a measured diagonal; below it NaN means not measured."""
    mat = np.asarray(R, dtype=float)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
        raise ContinualPeftError(
            f"accuracy matrix must be square T x T with T >= 1, got shape {mat.shape}; "
            "pass R[:t, :t] for the first t tasks."
        )
    rows, cols = np.tril_indices(mat.shape[0])
    values = mat[rows, cols]
    wrong = np.isinf(values) | ((rows == cols) & np.isnan(values))
    if wrong.any():
        i, j = int(rows[wrong][0]), int(cols[wrong][0])
        raise ContinualPeftError(
            f"accuracy matrix entry R[{i}, {j}] (0-based) is {mat[i, j]}; every diagonal entry "
            "must be a measured accuracy (each task is measured just after its training), and "
            "one below it a measured accuracy or NaN (not measured)."
        )
    return mat


def _last_row(mat: np.ndarray) -> np.ndarray | None:
    """R[T, :], or None while an entry of it is not measured."""
    last = mat[-1]
    return None if np.isnan(last).any() else last


def average_accuracy(R: ArrayLike) -> float | None:
    """ACC: mean accuracy over all tasks after training the last one.

    Args:
        R: Accuracy matrix, T x T.

    Returns:
        ``mean_j R[T, j]``, or None while an entry of the last row is not measured.
    """
    last = _last_row(_as_matrix(R))
    return None if last is None else float(last.mean())


def average_incremental_accuracy(R: ArrayLike) -> float:
    """Average of the average accuracy over seen tasks, taken after every task.

    Args:
        R: Accuracy matrix, T x T.

    Returns:
        ``mean_i mean_{j<=i} R[i, j]`` over the rows i whose entries j <= i were all measured
        (the first row always is: its one entry is on the diagonal).
    """
    mat = _as_matrix(R)
    rows = [mat[i, : i + 1] for i in range(mat.shape[0])]
    return float(np.mean([row.mean() for row in rows if not np.isnan(row).any()]))


def backward_transfer(R: ArrayLike) -> float | None:
    """BWT (Lopez-Paz & Ranzato 2017): how training later tasks changed earlier ones.

    Args:
        R: Accuracy matrix, T x T.

    Returns:
        ``1/(T-1) * sum_{j<T} (R[T, j] - R[j, j])``, or None when T = 1 or an entry of the
        last row is not measured.
    """
    mat = _as_matrix(R)
    n, last = mat.shape[0], _last_row(mat)
    if n == 1 or last is None:
        return None
    earlier = np.arange(n - 1)
    return float(np.mean(last[earlier] - mat[earlier, earlier]))


def forward_transfer(R: ArrayLike, b: ArrayLike | None) -> float | None:
    """FWT: accuracy on a task just before training it, relative to its untrained baseline.

    Args:
        R: Accuracy matrix, T x T; uses the superdiagonal ``R[j-1, j]``.
        b: Length-T accuracies ``b[j]`` of task j's untrained head on the bare backbone.

    Returns:
        ``1/(T-1) * sum_{j>1} (R[j-1, j] - b[j])``, or None when T = 1, ``b`` is None, or any
        needed entry is NaN (not measured).
    """
    mat = _as_matrix(R)
    n = mat.shape[0]
    if n == 1 or b is None:
        return None
    base = np.asarray(b, dtype=float)
    if base.shape != (n,):
        raise ContinualPeftError(
            f"initial accuracy b must have one entry per task ({n}), got shape {base.shape}."
        )
    later = np.arange(1, n)
    gains = mat[later - 1, later] - base[later]
    if not np.isfinite(gains).all():
        return None
    return float(gains.mean())


def forgetting(R: ArrayLike) -> float | None:
    """F (Chaudhry et al. 2018): drop from each task's best accuracy to its final accuracy.

    The best accuracy of task j is taken over rows l = j..T-1 (1-based), i.e. only after task j
    was trained, so the pre-training measurement ``R[j-1, j]`` never counts as a peak; over the
    entries measured there (``R[j, j]`` always is).

    Args:
        R: Accuracy matrix, T x T.

    Returns:
        ``1/(T-1) * sum_{j<T} (max_{l<T} R[l, j] - R[T, j])``, or None when T = 1 or an entry
        of the last row is not measured.
    """
    mat = _as_matrix(R)
    n, last = mat.shape[0], _last_row(mat)
    if n == 1 or last is None:
        return None
    drops = [np.nanmax(mat[j : n - 1, j]) - last[j] for j in range(n - 1)]
    return float(np.mean(drops))


def avalanche_forgetting(R: ArrayLike) -> list[float | None]:
    """Avalanche's per-task forgetting: accuracy just after training a task minus final accuracy.

    Args:
        R: Accuracy matrix, T x T.

    Returns:
        ``R[j, j] - R[T, j]`` for every task j, with None for the last task (never forgotten)
        and where ``R[T, j]`` is not measured.
    """
    mat = _as_matrix(R)
    n = mat.shape[0]
    per_task: list[float | None] = [
        None if np.isnan(mat[-1, j]) else float(mat[j, j] - mat[-1, j]) for j in range(n - 1)
    ]
    return [*per_task, None]


def compute_metrics(R: ArrayLike, b: ArrayLike | None) -> dict[str, Any]:
    """Compute every metric of :data:`METRIC_DEFINITIONS` for one accuracy matrix.

    Args:
        R: Accuracy matrix, T x T (nested lists with None for unmeasured entries are fine).
        b: Length-T initial accuracies for FWT, or None if they were not measured.

    Returns:
        JSON-ready dict with keys ``acc``, ``avg_incremental_acc``, ``bwt``, ``fwt``,
        ``forgetting`` (float or None) and ``avalanche_forgetting`` (list of float or None);
        None where an entry a metric needs was not measured.
    """
    mat = _as_matrix(R)
    return {
        "acc": average_accuracy(mat),
        "avg_incremental_acc": average_incremental_accuracy(mat),
        "bwt": backward_transfer(mat),
        "fwt": forward_transfer(mat, b),
        "forgetting": forgetting(mat),
        "avalanche_forgetting": avalanche_forgetting(mat),
    }


# Answers of generation tasks (SQuAD's normalisation, Rajpurkar et al. 2016: lower case, no
# punctuation, no articles a/an/the, single spaces), and ROUGE-L from Google's `rouge-score`.
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """`text` lower-cased, without punctuation and the articles a/an/the, whitespace
    collapsed: what exact match compares."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share (0..1) of predictions equal to their reference after `normalize_answer`."""
    if not predictions:
        return float("nan")
    same = [
        normalize_answer(p) == normalize_answer(r)
        for p, r in zip(predictions, references, strict=True)
    ]
    return float(np.mean(same))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0..1) of predictions against references, computed by
    `rouge_score.rouge_scorer` (Lin 2004; its tokenizer lower-cases and keeps ASCII letters and
    digits only, no stemming)."""
    from rouge_score import rouge_scorer

    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return float(np.mean(scores))

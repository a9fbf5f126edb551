"""Task-vector merging equals peft's own merge utilities (`peft.utils.merge_utils`), the oracle
the issue names, on the same vectors, weights and (for DARE) the same random draws."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert
from peft.utils import merge_utils

from continual_peft.errors import ContinualPeftError
from continual_peft.merging import merge_task_vectors


def task_vectors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 16, 24) task vectors of differing signs and scales, and (3,) weights."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(3, 16, 24, generator=generator) * torch.tensor([1.0, 0.3, 2.0]).view(
        3, 1, 1
    )
    return vectors, torch.tensor([0.5, 1.0, 0.7])


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize("density", [1.0, 0.6, 0.2])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_peft(density, sign):
    vectors, weights = task_vectors()
    ours = merge_task_vectors(vectors, weights, "ties", density=density, sign=sign)
    theirs = merge_utils.ties(list(vectors), weights, density, majority_sign_method=sign)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_task_arithmetic_equals_peft_and_the_formula():
    vectors, weights = task_vectors(1)
    ours = merge_task_vectors(vectors, weights, "task_arithmetic")
    torch.testing.assert_close(ours, merge_utils.task_arithmetic(list(vectors), weights))
    plain = sum(w * v for w, v in zip(weights, vectors, strict=True))
    torch.testing.assert_close(ours, plain)


@pytest.mark.parametrize(
    ("method", "oracle"),
    [("dare_linear", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties)],
)
def test_dare_equals_peft_on_the_same_draws(method, oracle):
    vectors, weights = task_vectors(2)
    ours = merge_task_vectors(
        vectors, weights, method, density=0.4, generator=torch.Generator().manual_seed(7)
    )
    torch.manual_seed(7)  # peft draws from torch's default generator
    theirs = oracle(list(vectors), weights, 0.4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the drop is random: another draw merges otherwise
    other = merge_task_vectors(
        vectors, weights, method, density=0.4, generator=torch.Generator().manual_seed(8)
    )
    assert not torch.allclose(ours, other)


def test_ties_keeps_only_agreeing_entries():
    """Two tasks of opposite sign on an entry: the elected sign's task alone is averaged."""
    vectors = torch.tensor([[3.0, 1.0], [-1.0, 1.0]])
    merged = merge_task_vectors(vectors, torch.ones(2), "ties")
    assert merged.tolist() == [3.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "average"}, "unknown merge 'average'; valid choices: task_arithmetic"),
        ({"sign": "vote"}, "unknown sign rule 'vote'"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"weights": torch.ones(2)}, r"weights must have shape \(3,\)"),
        ({"weights": torch.tensor([1.0, float("nan"), 1.0])}, "weights must be finite"),
        ({"vectors": torch.ones(3, 4, dtype=torch.long)}, "floating tensor"),
        ({"vectors": torch.ones(0, 4)}, "at least one task"),
    ],
)
def test_bad_merges_are_refused(kwargs, message):
    vectors, weights = task_vectors()
    arguments = {"vectors": vectors, "weights": weights, **kwargs}
    with pytest.raises(ContinualPeftError, match=message):
        merge_task_vectors(**arguments)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("combination", "method"), [("svd", "task_arithmetic"), ("ties_svd", "ties")]
)
def test_merged_lora_deltas_equal_pefts_add_weighted_adapter(tokenizer, combination, method):
    """Two LoRA adapters of a tiny BERT: merging their ΔW = B A · scale here equals the ΔW of
    the adapter peft's `add_weighted_adapter` builds from them (its SVD at full rank, so the
    SVD loses nothing). DARE's draws come from peft's global generator after it has
    initialised the new adapter, so DARE is checked against merge_utils above instead."""
    from peft import LoraConfig, get_peft_model

    def lora() -> LoraConfig:
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        )

    model = get_peft_model(tiny_bert(tokenizer), lora(), adapter_name="a")
    model.add_adapter("b", lora())
    weights = [0.6, 1.0]
    model.add_weighted_adapter(
        ["a", "b"], weights, "merged", combination_type=combination, density=0.5, svd_rank=32
    )
    sites = [m for m in model.modules() if hasattr(m, "lora_A") and "merged" in m.lora_A]
    assert len(sites) == 4  # query and value of its 2 layers
    for site in sites:
        deltas = torch.stack([site.get_delta_weight("a"), site.get_delta_weight("b")])
        ours = merge_task_vectors(deltas, torch.tensor(weights), method, density=0.5)
        torch.testing.assert_close(ours, site.get_delta_weight("merged"), rtol=0, atol=1e-5)

"""Generative backbones (decoder-only and encoder-decoder): families, label scoring, routed
generation, prompts, persistence and the refusals, on tiny models built from configs."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, LM_WORDS, generated_together_and_alone, tiny_lm
from transformers import AutoConfig, WhisperConfig

from continual_peft import (
    Backbone,
    CausalBackbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    ModuleBank,
    Seq2SeqBackbone,
    Task,
)
from continual_peft.backbones.load import family
from continual_peft.backbones.tiny import save_tiny, tiny_model, word_tokenizer

ARCHITECTURES = ["llama", "qwen2", "gpt2", "t5"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a: save_tiny(root / a, a, LM_WORDS) for a in ("llama", "gpt2", "t5")}


def test_families_are_read_from_the_config(folders):
    assert {a: family(AutoConfig.from_pretrained(f)) for a, f in folders.items()} == {
        "llama": "causal",
        "gpt2": "causal",
        "t5": "seq2seq",
    }
    with pytest.raises(ContinualPeftError, match="whisper.*supported families"):
        family(WhisperConfig())


def test_a_folder_loads_as_its_familys_backbone(folders):
    causal = Backbone.from_pretrained(str(folders["llama"]), max_length=16, device=DEVICE)
    seq2seq = Backbone.from_pretrained(str(folders["t5"]), max_length=16, device=DEVICE)
    assert type(causal) is CausalBackbone and causal.tokenizer.padding_side == "left"
    assert type(seq2seq) is Seq2SeqBackbone and seq2seq.tokenizer.padding_side == "right"


def hand_logprobs(backbone, prompt: list[int], target: list[int]) -> float:
    """log p(target | prompt), one row alone, no padding, summed token by token."""
    model, device = backbone.model, backbone.device
    with torch.no_grad():
        if isinstance(backbone, Seq2SeqBackbone):
            start = model.config.decoder_start_token_id
            logits = model(
                input_ids=torch.tensor([prompt], device=device),
                decoder_input_ids=torch.tensor([[start, *target[:-1]]], device=device),
            ).logits[0]
            steps = range(len(target))
        else:
            logits = model(input_ids=torch.tensor([prompt + target], device=device)).logits[0]
            steps = range(len(prompt) - 1, len(prompt) + len(target) - 1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return float(sum(logp[step, token] for step, token in zip(steps, target, strict=True)))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_label_scores_equal_a_hand_computation(architecture):
    backbone = tiny_lm(architecture)
    prompts = backbone.encode(["Input: red of fruit Output:", "blue", "fox of crow plum"]).items
    targets = backbone.encode_targets(["apple", "plum fox", "yes"])
    assert all(t[-1] == backbone.eos_id for t in targets)  # every target ends with EOS
    with torch.no_grad():
        summed, counts = backbone.target_logprobs(prompts, targets)
    hand = [hand_logprobs(backbone, p, t) for p, t in zip(prompts, targets, strict=True)]
    torch.testing.assert_close(summed.cpu(), torch.tensor(hand), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [len(t) for t in targets]


def lora_bank(backbone, slots: int = 3) -> ModuleBank:
    """A bank of `slots` LoRA slots with non-zero B (as if trained), all frozen."""
    bank = ModuleBank(backbone, "lora", configs={"lora": _lora_config()})
    for seed in range(slots):
        bank.add_slot(seed)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                if p.dim() == 2 and not p.abs().sum():
                    p.normal_(0, 1.0, generator=torch.Generator(device="cpu").manual_seed(seed))
        bank.freeze_slot()
    return bank


def _lora_config():
    from continual_peft.modules.lora import LoRAConfig

    return LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["all-linear"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_routed_generation_equals_each_row_alone(architecture):
    backbone = tiny_lm(architecture)
    bank = lora_bank(backbone)
    prompts = backbone.encode(
        ["red of fruit", "Input: blue of animal Output:", "plum", "crow of green of red"]
    ).items
    slots = torch.tensor([[0, -1], [1, -1], [2, 0], [1, 2]], device="cpu")
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.3, 0.7]], device="cpu")
    together, alone = generated_together_and_alone(backbone, bank, prompts, slots, weights, 6)
    assert together == alone
    with bank.base_only():
        bare = backbone.generate(prompts, max_new_tokens=6)
    assert bare != together  # the slots do change what is written


def test_a_tokenizer_without_pad_pads_with_eos_and_one_without_eos_is_refused():
    tokenizer = word_tokenizer(LM_WORDS)
    tokenizer.pad_token = None
    model = tiny_model("llama", len(tokenizer))
    backbone = CausalBackbone(model, tokenizer, device=DEVICE, dtype="float32")
    assert backbone.pad_id == backbone.eos_id
    tokenizer = word_tokenizer(LM_WORDS)
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ContinualPeftError, match="no EOS token"):
        CausalBackbone(model, tokenizer, device=DEVICE, dtype="float32")


def test_a_long_prompt_is_cut_from_the_left_and_counted():
    backbone = tiny_lm("llama", max_length=4)
    encoded = backbone.encode(["red blue green Input: fox Output:", "red"])
    assert encoded.truncated == 1
    assert (
        backbone.tokenizer.convert_ids_to_tokens(encoded.items[0])
        == ["Input", ":", "fox", "Output", ":"][-4:]
    )


def test_a_label_without_tokens_and_bad_max_new_tokens_are_refused():
    backbone = tiny_lm("gpt2")
    with pytest.raises(ContinualPeftError, match="has no tokens"):
        backbone.encode_targets(["apple", ""], "task 'x': label")
    with pytest.raises(ContinualPeftError, match="max_new_tokens must be at least 1"):
        backbone.generate([[4, 5]], 0)
    with pytest.raises(ContinualPeftError, match="generation.max_new_tokens = 0"):
        LearnerConfig.from_dict({"generation": {"max_new_tokens": 0}})


def generation_task(name: str, pairs: list[tuple[str, str]], repeat: int = 6) -> Task:
    task = Task.from_examples(name, train=pairs * repeat, test=pairs)
    task.kind, task.template = "generation", "Input: {text} Output:"
    return task


def test_a_generation_task_on_an_encoder_is_refused(make_backbone):
    learner = ContinualLearner(make_backbone())
    with pytest.raises(ContinualPeftError, match="generation task.*encoder.*decoder-only"):
        learner.learn(generation_task("fruit", [("red", "apple"), ("blue", "plum")]))
    assert not learner.learned  # nothing half-learned


FRUIT = [("fruit of red", "apple"), ("fruit of blue", "plum"), ("fruit of green", "fox")]
ANIMAL = [("animal of red", "crow"), ("animal of blue", "fox"), ("animal of green", "apple")]


def small_config(strategy: str = "per_task", **generation) -> LearnerConfig:
    return LearnerConfig.from_dict(
        {
            "strategy": strategy,
            "router": "prototype",
            "train": {"epochs": 30, "batch_size": 6, "lr": 5e-3, "warmup": 0.0},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"max_new_tokens": 3, **generation},
        }
    )


def test_label_scoring_classification_learns_and_predicts_label_strings():
    backbone = tiny_lm("llama")
    learner = ContinualLearner(backbone, config=small_config())
    task = Task.from_examples(
        "colors",
        train=[("red", "yes"), ("blue", "no"), ("green", "no")] * 6,
        test=[("red", "yes"), ("blue", "no"), ("green", "no")],
    )
    task.template = "Input: {text} Output:"
    record = learner.learn(task)
    assert (
        record["metric"] == "accuracy" and learner.report["accuracy_matrix"]["oracle"][0][0] == 1.0
    )
    scores = learner.logits(["red", "blue"], ["colors", "colors"])
    assert scores.shape == (2, 2) and bool((scores <= 0).all())  # summed log-probabilities
    assert learner.predict(["red", "blue"], task="colors") == ["yes", "no"]


def test_generation_tasks_learn_route_and_survive_save_and_load(tmp_path):
    learner = ContinualLearner(tiny_lm("llama"), config=small_config())
    for task in (generation_task("fruit", FRUIT), generation_task("animal", ANIMAL)):
        learner.learn(task)
    matrix = learner.report["accuracy_matrix"]["oracle"]
    assert matrix[1] == [1.0, 1.0]  # exact match, each task through its own slot
    assert learner.records[-1]["metric"] == "exact_match"
    assert learner.records[-1]["text_scores"]["fruit"]["rouge_l"] == 1.0
    inputs = [x for x, _ in FRUIT + ANIMAL]
    assert learner.predict(inputs) == [y for _, y in FRUIT + ANIMAL]  # routed by prototypes
    learner.save(tmp_path / "saved")
    again = ContinualLearner.load(tmp_path / "saved", backbone=tiny_lm("llama"))
    assert again.predict(inputs) == learner.predict(inputs)
    assert again.predict(inputs[:3], task="fruit") == [y for _, y in FRUIT]


def colors_task() -> Task:
    pairs = [("red", "yes"), ("blue", "no"), ("green", "no")]
    return Task.from_examples(
        "colors", train=pairs * 6, test=pairs, template="Input: {text} Output:"
    )


def test_decode_generate_compares_texts_and_counts_answers_that_are_no_label():
    learner = ContinualLearner(tiny_lm("llama"), config=small_config(decode="generate"))
    learner.learn(colors_task())  # trained: it writes "yes"/"no"
    assert learner.report["accuracy_matrix"]["oracle"][0][0] == 1.0
    assert learner.records[0]["text_scores"]["colors"]["not_a_label"] == 0
    untrained = ContinualLearner(tiny_lm("llama"), config=small_config(decode="generate"))
    untrained.config.train.epochs = 1
    untrained.config.train.lr = 1e-9  # learns nothing: a random model writes anything
    untrained.learn(colors_task())
    written = untrained.predict(["red", "blue", "green"], task="colors")
    wrong = sum(w not in ("yes", "no") for w in written)
    assert untrained.records[0]["text_scores"]["colors"]["not_a_label"] == wrong > 0


def test_mean_label_scores_divide_by_the_label_length():
    backbone = tiny_lm("qwen2")
    learner = ContinualLearner(backbone, config=small_config(label_score="mean"))
    learner.config.train.epochs = 1
    task = Task.from_examples(
        "t", train=[("red", "plum fox"), ("blue", "no")] * 3, test=[("red", "plum fox")]
    )
    learner.learn(task)
    prompt = learner.heads.prompt_items("t", ["red"]).items
    targets = backbone.encode_targets(task.labels)
    with torch.no_grad(), learner.use_task("t"):
        scores = learner.heads.row_logits(prompt, ["t"])[0]
        summed, counts = backbone.target_logprobs(prompt * 2, targets)
    torch.testing.assert_close(scores, summed / counts)
    assert counts.tolist() == [3.0, 2.0] or counts.tolist() == [2.0, 3.0]


def test_eval_scores_generation_by_exact_match_and_does_not_warn_on_new_targets():
    from continual_peft.engine.evaluation import evaluate_records

    learner = ContinualLearner(tiny_lm("llama"), config=small_config())
    learner.learn(generation_task("fruit", FRUIT))
    records = [
        {"text": "fruit of red", "label": "The Apple!", "task": "fruit"},  # normalised
        {"text": "fruit of blue", "label": "a plum", "task": "fruit"},
        {"text": "fruit of green", "label": "fig", "task": "fruit"},
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "fig" is a new target, not an unknown label
        scores = evaluate_records(learner, records)
    assert scores["oracle_acc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "t5"])
def test_every_kind_mixed_per_row_in_one_batch_equals_each_row_alone(architecture):
    """LoRA, adapter and prompt slots in one bank; rows on different kinds (and none) in one
    batch: scores and generated tokens equal each row run alone."""
    from continual_peft.modules.adapter import AdapterConfig
    from continual_peft.modules.prompt import PromptConfig

    backbone = tiny_lm(architecture)
    configs = {
        "lora": _lora_config(),
        "adapter": AdapterConfig(placement="houlsby"),
        "prompt": PromptConfig(num_virtual_tokens=3),
    }
    bank = ModuleBank(backbone, "lora", configs=configs)
    for seed, kind in enumerate(["lora", "adapter", "prompt"]):
        bank.add_slot(seed, kind)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p))
        bank.freeze_slot()
    prompts = backbone.encode(["red of fruit", "Input: blue Output:", "plum", "crow of red"]).items
    targets = backbone.encode_targets(["apple", "fox crow", "yes", "no"])
    slots = torch.tensor([[0], [1], [2], [-1]], device="cpu")
    weights = torch.ones(4, 1, device="cpu")
    with torch.no_grad(), bank.route(slots, weights):
        scores, _ = backbone.target_logprobs(prompts, targets)
        written = backbone.generate(prompts, 5)
    for row in range(4):
        with torch.no_grad(), bank.route(slots[row : row + 1], weights[row : row + 1]):
            alone, _ = backbone.target_logprobs(prompts[row : row + 1], targets[row : row + 1])
            assert backbone.generate(prompts[row : row + 1], 5) == [written[row]]
        torch.testing.assert_close(scores[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_targets_or_answers_beyond_the_models_positions_are_refused_before_training():
    backbone = tiny_lm("gpt2", max_length=250)  # the tiny GPT-2 reads 256 positions
    learner = ContinualLearner(backbone, config=small_config())  # max_new_tokens 3: fits
    learner.learn(generation_task("fruit", FRUIT, repeat=1))
    wide = ContinualLearner(tiny_lm("gpt2", max_length=250), config=small_config(max_new_tokens=32))
    with pytest.raises(
        ContinualPeftError,
        match="max_new_tokens: a prompt of up to max_length "
        "250 \\+ 32 tokens exceeds the 256 positions",
    ):
        wide.learn(generation_task("fruit", FRUIT, repeat=1))
    assert not wide.learned and not wide.records  # rolled back before any training
    long_target = [("red", " ".join(["apple"] * 10))]
    with pytest.raises(ContinualPeftError, match="longest target \\(11 tokens"):
        ContinualLearner(tiny_lm("gpt2", max_length=250), config=small_config()).learn(
            Task.from_examples("long", train=long_target, test=long_target, kind="generation")
        )


def test_labels_the_tokenizer_cannot_tell_apart_are_refused_and_unknown_words_warned():
    learner = ContinualLearner(tiny_lm("llama"), config=small_config())
    tied = [("red", "awesome"), ("blue", "dreadful")]  # both <unk> for the word tokenizer
    with pytest.raises(ContinualPeftError, match="'awesome' and 'dreadful' have the same tokens"):
        learner.learn(Task.from_examples("tied", train=tied, test=tied))
    with pytest.warns(UserWarning, match="words this backbone's tokenizer does not know"):
        learner.learn(Task.from_examples("odd", train=tied, test=tied, kind="generation"))


def test_unusual_models_are_refused_with_what_is_missing(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration, CLIPConfig, CLIPModel

    from continual_peft.backbones.text import check_vocabulary

    tokenizer = word_tokenizer(LM_WORDS)
    sizes = {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_ffn_dim": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 32,
    }
    config = BartConfig(vocab_size=len(tokenizer), decoder_start_token_id=None, **sizes)
    with pytest.raises(ContinualPeftError, match="no decoder_start_token_id"):
        Seq2SeqBackbone(BartForConditionalGeneration(config), tokenizer, device=DEVICE)
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": 64,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
            },
            vision_config={
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "image_size": 8,
                "patch_size": 4,
            },
            projection_dim=8,
        )
    )
    with pytest.raises(ContinualPeftError, match="no single token-embedding table"):
        check_vocabulary(clip, tokenizer, "clip-folder")


def test_a_stream_with_a_generation_task_on_an_encoder_is_refused_before_training(
    make_backbone, tmp_path
):
    from continual_peft import Stream
    from continual_peft.experiments.runner import run_stream

    colors = Task.from_examples(
        "colors", train=[("red", "a"), ("blue", "b")] * 3, test=[("red", "a"), ("blue", "b")]
    )
    stream = Stream("mixed", [colors, generation_task("fruit", FRUIT)])
    with pytest.raises(ContinualPeftError, match="generation task, but this backbone"):
        run_stream(stream, LearnerConfig(), run_dir=tmp_path / "run", make_backbone=make_backbone)
    assert not (tmp_path / "run" / "tasks" / "colors").exists()  # nothing was trained


def test_predict_and_eval_files_may_use_a_generation_tasks_keys(tmp_path):
    from continual_peft.tasks.records import read_records

    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fruit of red", "target": "apple", "task": "fruit"}\n', "utf-8")
    assert read_records(path) == [{"text": "fruit of red", "label": "apple", "task": "fruit"}]


def test_a_tasks_template_and_kind_are_part_of_its_data_hash():
    from continual_peft.store.digests import task_digest

    plain = Task.from_examples("t", train=FRUIT, test=FRUIT)
    assert task_digest(plain) == task_digest(Task.from_examples("t", train=FRUIT, test=FRUIT))
    templated = Task.from_examples("t", train=FRUIT, test=FRUIT, template="Q: {text} A:")
    written = Task.from_examples("t", train=FRUIT, test=FRUIT, kind="generation")
    assert len({task_digest(plain), task_digest(templated), task_digest(written)}) == 3


def test_a_seq2seq_decoders_positions_are_checked_and_mixed_answer_modes_share_a_batch():
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = word_tokenizer(LM_WORDS)
    sizes = {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_ffn_dim": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 16,
    }
    bart = BartForConditionalGeneration(BartConfig(vocab_size=len(tokenizer), **sizes))
    backbone = Seq2SeqBackbone(bart, tokenizer, max_length=8, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=small_config(max_new_tokens=20))
    with pytest.raises(ContinualPeftError, match="decoder's start token \\+ 20 tokens exceeds"):
        learner.learn(generation_task("fruit", FRUIT, repeat=1))
    # a classification task (scored) and a generation task (written) in one routed batch
    mixed = ContinualLearner(tiny_lm("gpt2"), config=small_config())
    mixed.config.train.epochs = 1
    mixed.learn(colors_task())
    mixed.learn(generation_task("fruit", FRUIT, repeat=1))
    together = mixed.predict(["red", "fruit of red", "blue"], task=["colors", "fruit", "colors"])
    assert together[0] in ("yes", "no") and together[2] in ("yes", "no")
    rows = [("red", "colors"), ("fruit of red", "fruit"), ("blue", "colors")]
    assert together == [mixed.predict([x], task=t)[0] for x, t in rows]
    assert len(mixed.predict(["red", "fruit of red"])) == 2  # routed: both modes, one call


def test_input_files_giving_both_a_key_and_its_alias_are_refused(tmp_path):
    from continual_peft.tasks.records import read_records

    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a", "prompt": "b"}\n', "utf-8")
    with pytest.raises(ContinualPeftError, match="in.jsonl:1: both 'text' and 'prompt'"):
        read_records(path)
    path.write_text('{"text": "a", "label": "x", "target": "y"}\n', "utf-8")
    with pytest.raises(ContinualPeftError, match="both 'label' and 'target'"):
        read_records(path)


def test_save_tiny_refuses_qwen2_whose_folder_tokenizer_would_not_read_words(tmp_path):
    with pytest.raises(ValueError, match="build it in memory"):
        save_tiny(tmp_path / "q", "qwen2", LM_WORDS)

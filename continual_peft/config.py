"""Run configuration: small dataclasses, in the layout of a strategy spec file
(`strategies/*.toml`, read by `strategies.load_strategy_spec`):

    strategy = "per_task"        # a registered strategy (continual-peft list strategies)
    module = "lora"              # a registered module kind
    router = "oracle"            # oracle (task given), prototype, mahalanobis, gate, topk
    max_slots = 50               # per_task: at most 50 slots, the most similar two merged beyond
    [strategy_options]           # keyword arguments of the strategy, e.g. for replay:
    buffer_size = 200
    [router_options]             # keyword arguments of the router, e.g. for topk:
    base = "mahalanobis"
    k = 2
    seed = 0
    [tasks.news-topic]           # per-task override: this task gets a prompt slot
    module = "prompt"
    [backbone]
    name = ""                    # local folder or model name; "" = bundled all-MiniLM-L6-v2
    max_length = 128
    quantize = "none"            # or "8bit" / "4bit": bitsandbytes base weights (extra [quant])
    [lora]                       # fields of LoRAConfig; likewise [adapter], [prompt], [prefix]
    r = 8
    [train]                      # fields of TrainConfig
    epochs = 3
    [evaluation]                 # fields of EvaluationConfig; absent = every entry measured
    every = 5                    # old tasks re-evaluated after every 5th task only
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from continual_peft.backbones.placement import DTYPES
from continual_peft.backbones.quantization import QUANT_TYPES, QUANTIZE
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import MODULE_KINDS, kind_parts
from continual_peft.registry import validate_task_name
from continual_peft.routers import ROUTERS
from continual_peft.spec import Section


@dataclass
class TrainConfig:
    """How one task's module and head are trained."""

    epochs: int = 3  # passes over the task's training set
    batch_size: int = 16  # training batch size
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay (only the trainable slot and head see it)
    warmup: float = 0.1  # share of steps with linear warm-up, then linear decay to zero
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_batch_size: int = 64  # batch size for evaluation and prediction


@dataclass
class BackboneConfig:
    """Which frozen backbone."""

    name: str = ""  # local folder or model name; "" = the bundled all-MiniLM-L6-v2
    max_length: int = 128  # longer inputs are truncated (and counted in the report)
    device: str = ""  # "" = CUDA when present, else CPU
    dtype: str = "auto"  # frozen weights: auto (bf16 on CUDA with bf16, else fp32), or a dtype
    threads: int = 0  # torch CPU threads; 0 = auto (`placement.set_threads`)
    # frozen linear weights: "none", "8bit" (LLM.int8) or "4bit" (QLoRA), through bitsandbytes
    quantize: str = "none"
    quant_type: str = "nf4"  # 4bit: "nf4" or "fp4"
    double_quant: bool = True  # 4bit: quantize the block scales too
    int8_threshold: float = 6.0  # 8bit: LLM.int8's outlier threshold
    quant_skip: list[str] = field(default_factory=list)  # layer names kept in full precision


@dataclass
class GenerationConfig:
    """How generative backbones (decoder-only, encoder-decoder) answer; unused on encoders."""

    decode: str = "score"  # classification: "score" every label string, or "generate" greedily
    label_score: str = "sum"  # a label's score: "sum" or "mean" of its tokens' log-probabilities
    max_new_tokens: int = 32  # longest greedy answer, in tokens (generation tasks, "generate")


@dataclass
class EvaluationConfig:
    """Which entries of the accuracy matrices are measured after each task. The newest task is
    always measured on all its test rows, and the last task of a known stream gets a full row."""

    every: int = 1  # re-evaluate the old tasks after every k-th task only (others: not measured)
    sample: int = 0  # old tasks on a fixed seeded sample of at most this many test rows; 0 = all


# the quantization details: recorded only for a quantized backbone
QUANT_KEYS = ("quant_type", "double_quant", "int8_threshold", "quant_skip")
DECODES = ("score", "generate")
LABEL_SCORES = ("sum", "mean")


# where a run computes, not what it is: a run may resume or load with other values
@dataclass
class LearnerConfig:
    """Everything that decides a run's numbers, besides the data."""

    strategy: str = "per_task"  # how slots are allocated and trained
    module: str = "lora"  # module kind
    router: str = "oracle"  # how inputs reach slots
    seed: int = 0  # seeds slot/head init, shuffling and dropout
    max_slots: int = 0  # slot budget: consolidate the most similar pair beyond it; 0 = none
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    modules: dict[str, Any] = field(default_factory=dict)  # kind -> its config (default if absent)
    task_modules: dict[str, str] = field(default_factory=dict)  # task -> kind, per-task override
    router_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the router
    strategy_options: dict[str, Any] = field(default_factory=dict)  # e.g. a replay buffer's size

    @classmethod
    def of(
        cls,
        strategy: str = "per_task",
        module: str = "lora",
        module_config: object = None,
        train: TrainConfig | None = None,
        seed: int = 0,
        max_length: int = 128,
    ) -> LearnerConfig:
        """The config of `ContinualLearner(strategy=..., module=..., ...)`: one module kind
        (with `module_config`, else its defaults), training settings and the backbone's
        max_length, everything else default."""
        return cls(
            strategy=strategy,
            module=module,
            seed=seed,
            train=train or TrainConfig(),
            modules={module: module_config} if module_config is not None else {},
            backbone=BackboneConfig(max_length=max_length),
        )

    def kind_config(self, kind: str) -> Any:
        """The config of module kind `kind` (its defaults unless set); `modules` is not changed."""
        if kind in self.modules:
            return self.modules[kind]
        return MODULE_KINDS.options_type(kind)()

    def part_kinds(self) -> list[str]:
        """The plain kinds the run's slots use, each once: the parts of `module` and of every
        per-task override (`"lora+prompt"` uses lora and prompt)."""
        kinds = [self.module, *self.task_modules.values()]
        return list(dict.fromkeys(part for kind in kinds for part in kind_parts(kind)))

    def module_for(self, task: str) -> str:
        """The module kind of `task`: its override, else the run's `module`."""
        return self.task_modules.get(task, self.module)

    def to_dict(self) -> dict[str, Any]:
        """A nested dict in the spec file's layout (every registered kind's section included)."""
        data = {key: getattr(self, key) for key in ("strategy", "module", "router", "seed")}
        if self.max_slots:  # absent = no budget: unbudgeted configs keep their hashes
            data["max_slots"] = self.max_slots
        data["backbone"] = dataclasses.asdict(self.backbone)
        if self.backbone.quantize == "none":  # absent = full precision (runs from before it)
            for key in QUANT_KEYS:
                data["backbone"].pop(key)
        data["train"] = dataclasses.asdict(self.train)
        if self.generation != GenerationConfig():  # absent = defaults (runs from before it)
            data["generation"] = dataclasses.asdict(self.generation)
        if self.evaluation != EvaluationConfig():  # absent = every entry measured in full
            data["evaluation"] = dataclasses.asdict(self.evaluation)
        for kind in MODULE_KINDS.names():
            data[kind] = dataclasses.asdict(self.kind_config(kind))
        data["tasks"] = {task: {"module": kind} for task, kind in self.task_modules.items()}
        data["router_options"] = dict(self.router_options)
        data["strategy_options"] = dict(self.strategy_options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> LearnerConfig:
        """Build from a nested dict (a parsed spec), naming any bad key."""
        fixed = {"strategy", "module", "router", "seed", "backbone", "train", "tasks"}
        fixed |= {"generation", "evaluation"}
        fixed |= {"router_options", "strategy_options", "max_slots"}
        top = Section(data, where, fixed | set(MODULE_KINDS.names()))
        values: dict[str, Any] = {}
        for key in ("strategy", "module", "router"):
            values[key] = top.get(key, str, getattr(cls, key))
        values["seed"] = top.get("seed", int, 0)
        values["max_slots"] = top.get("max_slots", int, 0)
        values["backbone"] = _fill(
            BackboneConfig, top.get("backbone", dict, {}), f"{where}: [backbone]"
        )
        values["train"] = _fill(TrainConfig, top.get("train", dict, {}), f"{where}: [train]")
        values["generation"] = _fill(
            GenerationConfig, top.get("generation", dict, {}), f"{where}: [generation]"
        )
        values["evaluation"] = _fill(
            EvaluationConfig, top.get("evaluation", dict, {}), f"{where}: [evaluation]"
        )
        read = {
            kind: _kind_options(kind, top.get(kind, dict), f"{where}: [{kind}]")
            for kind in MODULE_KINDS.names()
            if kind in data
        }
        # a kind at its defaults is left out, as `kind_config` reads an absent kind: a config
        # and its `to_dict()` read back are equal
        values["modules"] = {
            kind: options
            for kind, options in read.items()
            if options != MODULE_KINDS.options_type(kind)()
        }
        values["task_modules"] = _task_modules(top.get("tasks", dict, {}), where)
        values["router_options"] = top.get("router_options", dict, {})
        values["strategy_options"] = top.get("strategy_options", dict, {})
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        """Refuse values that cannot train, naming the key and the valid range; unknown module
        kinds and routers, and router options the router does not take. (The strategy and its
        options: `strategies.check_config`, since strategies build on configs.)

        Raises:
            ContinualPeftError: `<where>: <key> = <value> is invalid; it must be <rule>` (and
                alike).
        """
        train, lora = self.train, self.kind_config("lora")
        _check_ranges(
            where,
            [
                ("train.epochs", train.epochs, train.epochs >= 1, ">= 1"),
                ("train.batch_size", train.batch_size, train.batch_size >= 1, ">= 1"),
                (
                    "train.eval_batch_size",
                    train.eval_batch_size,
                    train.eval_batch_size >= 1,
                    ">= 1",
                ),
                ("train.lr", train.lr, train.lr > 0, "> 0"),
                ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, ">= 0"),
                ("train.warmup", train.warmup, 0 <= train.warmup < 1, "in [0, 1)"),
                ("train.grad_clip", train.grad_clip, train.grad_clip >= 0, ">= 0"),
                (
                    "backbone.max_length",
                    self.backbone.max_length,
                    self.backbone.max_length >= 2,
                    ">= 2",
                ),
            ],
        )
        if self.backbone.dtype not in DTYPES:
            raise ContinualPeftError(
                f"{where}: backbone.dtype = {self.backbone.dtype!r} is invalid; valid choices: "
                f"{', '.join(DTYPES)} (auto = bfloat16 on a CUDA device that supports it, "
                "float32 elsewhere)"
            )
        _check_quantization(self.backbone, where)
        _check_generation(self.generation, where)
        _check_max_slots(self.max_slots, where)
        _check_evaluation(self.evaluation, where)
        kinds = [("module", self.module)]
        kinds += [(f"tasks.{task}.module", kind) for task, kind in self.task_modules.items()]
        for key, kind in kinds:
            kind_parts(kind, f"{where}: {key}")
        _check_ranges(
            where,
            [
                ("lora.r", lora.r, lora.r >= 1, ">= 1"),
                ("lora.alpha", lora.alpha, lora.alpha > 0, "> 0"),
                ("lora.dropout", lora.dropout, 0 <= lora.dropout < 1, "in [0, 1)"),
            ],
        )
        if self.router not in ROUTERS:
            valid = ", ".join(ROUTERS.names())
            raise ContinualPeftError(
                f"{where}: unknown router {self.router!r}; valid names: {valid}"
            )
        if self.router != "oracle":  # oracle builds no router: its options are unused
            ROUTERS.check_options(self.router, self.router_options, where)
            try:  # values too, before any backbone loads (a router is cheap until fitted)
                ROUTERS.build(self.router, self.router_options)
            except ContinualPeftError as err:  # named as the spec's table names the key
                text = str(err).removeprefix(f"{self.router}: ")
                raise ContinualPeftError(
                    f"{where}: [router_options] of router {self.router!r}: {text}"
                ) from None
        elif self.router_options.get("reject_rate"):  # it would be ignored: refuse it
            raise ContinualPeftError(
                f"{where}: reject_rate {self.router_options['reject_rate']!r} needs a router "
                "that scores tasks (prototype, mahalanobis, gate or topk, e.g. --router "
                "mahalanobis); with oracle routing every input is sent to its own task"
            )


def _task_modules(tasks: dict[str, Any], where: str) -> dict[str, str]:
    """Per-task overrides: `[tasks.<name>] module = "<kind>"`."""
    overrides = {}
    for name, table in tasks.items():
        validate_task_name(name, f"{where}: [tasks.{name}]")
        section = Section(table, f"{where}: [tasks.{name}]", {"module"})
        overrides[name] = section.get("module", str, required=True)
    return overrides


def _check_quantization(backbone: BackboneConfig, where: str) -> None:
    """Refuse an unknown `quantize`, and a detail the chosen quantization does not use (a
    4-bit type on 8-bit weights, any detail without quantization): it would be ignored."""
    typed = [
        ("quantize", str, "a text: 'none', '8bit' or '4bit'"),
        ("quant_type", str, "a text: 'nf4' or 'fp4'"),
        ("double_quant", bool, "true or false"),
        ("int8_threshold", (int, float), "a number"),
        ("quant_skip", list, "a list of layer names"),
    ]
    for key, kind, rule in typed:
        value = getattr(backbone, key)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ContinualPeftError(
                f"{where}: backbone.{key} = {value!r} is invalid; it must be {rule}"
            )
    _check_ranges(
        where,
        [
            _choice("backbone.quantize", backbone.quantize, QUANTIZE),
            _choice("backbone.quant_type", backbone.quant_type, QUANT_TYPES),
            (
                "backbone.int8_threshold",
                backbone.int8_threshold,
                backbone.int8_threshold > 0,
                "> 0",
            ),
        ],
    )
    bad = [name for name in backbone.quant_skip if not isinstance(name, str) or not name]
    if bad:
        raise ContinualPeftError(
            f"{where}: backbone.quant_skip = {backbone.quant_skip!r} is invalid; it must list "
            "layer names (e.g. ['lm_head'])"
        )
    default = BackboneConfig()
    used = {"none": (), "8bit": ("int8_threshold", "quant_skip")}
    used["4bit"] = ("quant_type", "double_quant", "quant_skip")
    unused = [
        key
        for key in QUANT_KEYS
        if key not in used[backbone.quantize] and getattr(backbone, key) != getattr(default, key)
    ]
    if unused:
        setting = ", ".join(f"backbone.{key} = {getattr(backbone, key)!r}" for key in unused)
        needs = "quantize = '4bit' or '8bit'" if backbone.quantize == "none" else "the other one"
        raise ContinualPeftError(
            f"{where}: {setting} has no effect with quantize = {backbone.quantize!r} (it applies "
            f"to {needs}: quant_type and double_quant to 4bit, int8_threshold to 8bit); set "
            "the quantization it belongs to, or leave it out"
        )


def _check_generation(generation: GenerationConfig, where: str) -> None:
    _check_ranges(
        where,
        [
            _choice("generation.decode", generation.decode, DECODES),
            _choice("generation.label_score", generation.label_score, LABEL_SCORES),
            (
                "generation.max_new_tokens",
                generation.max_new_tokens,
                generation.max_new_tokens >= 1,
                ">= 1",
            ),
        ],
    )


def _check_evaluation(evaluation: EvaluationConfig, where: str) -> None:
    """Whole numbers only (a bool is not one): `every` >= 1, `sample` >= 0."""
    rules = {
        "every": (1, "1 re-evaluates every old task after every task"),
        "sample": (0, "0 measures every test row"),
    }
    for key, (least, meaning) in rules.items():
        value = getattr(evaluation, key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or not least <= value <= MOST:
            raise ContinualPeftError(
                f"{where}: evaluation.{key} = {value!r} is invalid; it must be an integer "
                f"from {least} to {MOST:,} ({meaning})"
            )


# the largest count a setting takes (slots, tasks between re-evaluations, sampled rows): beyond
# it a value means "never" or "all", which 0 and 1 already say; JSON and int64 hold it exactly
MOST = 1_000_000


def _check_max_slots(max_slots: Any, where: str) -> None:
    """A whole number (a bool is not one): 0 (no budget) or at least 2, since making room
    merges two slots into one. Whether the strategy takes a budget: `strategies.check_config`."""
    whole = isinstance(max_slots, int) and not isinstance(max_slots, bool)
    if not whole or not (max_slots == 0 or 2 <= max_slots <= MOST):
        raise ContinualPeftError(
            f"{where}: max_slots = {max_slots!r} is invalid; it must be an integer from 2 to "
            f"{MOST:,} (the most slots the bank holds: beyond it the two most similar slots are "
            "merged into one) or 0 for no budget (--max-slots N)"
        )


def _choice(key: str, value: Any, choices: tuple) -> tuple[str, Any, bool, str]:
    """A `_check_ranges` check that `value` is one of `choices`, naming them."""
    return key, value, value in choices, " or ".join(map(repr, choices))


def _check_ranges(where: str, checks: list[tuple[str, Any, bool, str]]) -> None:
    """Refuse the first (key, value, ok, rule) that is not ok, naming key, value and rule; a
    number that is not finite (inf, nan) is never ok (JSON could not even record it)."""
    for key, value, ok, rule in checks:
        finite = not isinstance(value, float) or math.isfinite(value)
        if not ok or not finite:
            raise ContinualPeftError(
                f"{where}: {key} = {value!r} is invalid; it must be {rule}"
                + (" and finite" if isinstance(value, float) else "")
            )


def _kind_options(kind: str, table: dict[str, Any], where: str) -> Any:
    """A module kind's section (`[lora]`), checked by its registry, then typed."""
    MODULE_KINDS.check_options(kind, table, where)
    return _fill(MODULE_KINDS.options_type(kind), table, where)


def _fill(kind: type, data: dict[str, Any], where: str) -> Any:
    section = Section(data, where, {f.name for f in dataclasses.fields(kind)})
    default = kind()
    values = {}
    for f in dataclasses.fields(kind):
        expected = type(getattr(default, f.name))
        accepted = (int, float) if expected is float else expected
        values[f.name] = section.get(f.name, accepted, getattr(default, f.name))
    try:
        return kind(**values)
    except ContinualPeftError as err:  # the dataclass's own check: say where the value came from
        raise ContinualPeftError(f"{where}: {err}") from None

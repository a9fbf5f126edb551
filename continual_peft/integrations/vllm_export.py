"""Export a whole run for multi-LoRA servers (vLLM, LoRAX), and the router that picks an adapter.

    export_adapters("runs/my-run", "export/my-run-vllm")
    router = AdapterRouter.from_folder("export/my-run-vllm")
    router(["a request", "another"])  # -> ["agnews", None]: a task's adapter, or None (rejected)

A multi-LoRA server loads many peft LoRA adapters on one base model and applies the one each
request names. `export_adapters` writes every task's LoRA as such an adapter, named by its task,
plus the run's router, so a server's user keeps the server and routes as `predict` does:

    adapters/<task>/      the task's `peft` export (`peft_export.export_task`'s files)
    router/               router.safetensors + router.json (`routers.persist.save_router`)
    continual_peft.json   tasks in the router's order, each adapter's rank, slots and shared or
                          merged slots, the base model and its fingerprint, the run's config
    lora-modules.txt      `name=path` per adapter, for `vllm serve --lora-modules`
    route.py              a runnable example of `AdapterRouter`
    README.md             how to serve it with vLLM and LoRAX

`AdapterRouter` reads that folder back: the run's backbone built as `predict` builds it, the
frozen features computed by the same code (`ContinualLearner.features`), the same router. Its
choice for a text is `predict`'s `task` for that text routed, None where the router rejects it.

Only runs whose every routed answer is one task's LoRA export: every task's module a LoRA, a
router (not oracle) that picks one task per row (not topk with k > 1, which mixes k tasks'
modules), and no fallback slot (route_or_merge answers rejected rows through a merged slot that
no task's adapter holds). Anything else is refused by name, with the reason, before anything is
written; nothing is written to `out` unless the whole export succeeds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.text import model_name
from continual_peft.config import LearnerConfig
from continual_peft.engine.learner import ContinualLearner
from continual_peft.engine.prediction import in_chunks
from continual_peft.engine.saved_run import SavedRun, read_run
from continual_peft.errors import ContinualPeftError
from continual_peft.integrations.export_source import (
    EXPORTABLE_KINDS,
    SERVER_FORMAT,
    SERVER_KINDS,
    ExportSource,
    module_kinds,
    read_task,
)
from continual_peft.integrations.lora_layers import read_layout
from continual_peft.integrations.peft_export import (
    check_moved_backbone,
    check_out,
    staged,
    write_task,
)
from continual_peft.routers import Router, TopKRouter, load_router, load_router_files, save_router
from continual_peft.store.io import PathLike, atomic_write_json, atomic_write_text, load_json
from continual_peft.strategies.base import Strategy, build_strategy
from continual_peft.tasks.generation import fill_template

EXPORT_VERSION = 1  # of continual_peft.json below; `AdapterRouter` reads this version
INFO_FILE = "continual_peft.json"
ADAPTERS, ROUTER = "adapters", "router"  # the folders
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # no "=", space or "/" (name=path)


def export_adapters(run_dir: str | Path, out: str | Path, *, backbone: str | None = None) -> Path:
    """Write every task of a run as a peft LoRA adapter named by its task, with the run's router
    and `AdapterRouter`'s metadata, into the folder `out` (the layout in the module docstring).

    Args:
        run_dir: A finished (or partly finished) run directory with a router.
        out: The folder to create; it must not exist yet or be empty.
        backbone: The run's backbone from another folder (a moved model); its fingerprint is
            checked, and the adapters and `AdapterRouter` name that folder.

    Returns:
        `out`.

    Raises:
        ContinualPeftError: A run without a router, a router that mixes tasks, a strategy with
            a fallback slot, tasks whose module is no LoRA (all named), a task name a server
            cannot take, a non-empty `out`, or as `peft_export.export_task` for each task.
        CorruptFileError: A run file that cannot be read back.
    """
    run_dir = Path(run_dir)
    out = check_out(run_dir, Path(out))
    saved = read_run(run_dir)
    names = saved.checkpoint.task_names
    _check_servable(saved, names)
    router = _run_router(saved)
    sources = [read_task(run_dir, name, saved) for name in names]
    if backbone is not None:
        for source in sources:
            source.moved_backbone = model_name(backbone)
        check_moved_backbone(sources[0], backbone)
    first = sources[0]
    layout = read_layout(first.backbone_path, first.fingerprint.get("model_class", ""))
    for source in sources:
        source.layout = layout
        layout.check(list(source.sites), source.task)
    info = _info(saved, sources, router)
    with staged(out) as folder:
        for source in sources:
            adapter = folder / ADAPTERS / source.task
            adapter.mkdir(parents=True)
            write_task(source, adapter, "peft")
        save_router(router, folder / ROUTER)
        atomic_write_json(folder / INFO_FILE, info)
        final = out.resolve()
        # relative to the folder, so it still holds after a move or a copy to the server
        modules = [f"{name}={ADAPTERS}/{name}" for name in names]
        atomic_write_text(folder / "lora-modules.txt", "\n".join(modules) + "\n")
        atomic_write_text(folder / "route.py", ROUTE_EXAMPLE)
        atomic_write_text(folder / "README.md", _readme(info, final))
    return out


def _check_servable(saved: SavedRun, names: list[str]) -> None:
    """Refuse a run whose routed answers are not each one task's LoRA, naming why."""
    config, run = saved.config, saved.folder
    if saved.checkpoint.router is None:
        raise ContinualPeftError(
            f"run {run} has no router (router 'oracle': the task is given with every input), so "
            f"there is nothing to pick an adapter per request; export each task with --format "
            "peft (--task NAME), or train the run with a router (e.g. --router mahalanobis)"
        )
    strategy = build_strategy(config.strategy, config.strategy_options)
    if type(strategy).fallback is not Strategy.fallback:
        raise ContinualPeftError(
            f"run {run}: strategy {config.strategy!r} answers the rows its router rejects or is "
            "unsure of through a fallback (merged) slot that no task's adapter holds, so a server "
            "given one adapter per request would answer them otherwise than `predict`; export "
            "each task with --format peft instead"
        )
    others = {name: sorted(module_kinds(saved, name)) for name in names}
    others = {name: kinds for name, kinds in others.items() if set(kinds) - set(SERVER_KINDS)}
    if others:
        listed = ", ".join(f"{name!r} ({', '.join(kinds)})" for name, kinds in others.items())
        raise ContinualPeftError(
            f"run {run}: task(s) {listed} go through modules that are not LoRA; multi-LoRA "
            f"servers load only LoRA adapters, so format {SERVER_FORMAT!r} exports runs whose "
            f"every task is a LoRA. Export a task of one kind of {EXPORTABLE_KINDS} with "
            "--format peft --task NAME; a hybrid slot is served by continual-peft serve"
        )
    bad = [name for name in names if not SERVER_NAME.fullmatch(name)]
    if bad:
        raise ContinualPeftError(
            f"run {run}: task name(s) {bad} cannot name a server's adapter (letters, digits, "
            "'_', '-' and '.' only, as `--lora-modules name=path` reads them)"
        )


def _run_router(saved: SavedRun) -> Router:
    """The run's router, as `ContinualLearner.load` rebuilds it; refused if it mixes tasks."""
    files, run = saved.checkpoint.router, saved.folder
    router = load_router_files(
        run / files.tensors, run / files.meta, [run / path for path in files.task_rows], "cpu"
    )
    if isinstance(router, TopKRouter) and router.k > 1:
        raise ContinualPeftError(
            f"run {run}: router 'topk' mixes the modules of each row's {router.k} best tasks, "
            "but a server applies one adapter per request, so its answers would differ from "
            "`predict`'s; train with k = 1 (or a scoring router such as mahalanobis), or export "
            "each task with --format peft"
        )
    return router


def _info(saved: SavedRun, sources: list[ExportSource], router: Router) -> dict:
    """continual_peft.json: what `AdapterRouter` and a reader need, adapters in router order."""
    checkpoint, adapters = saved.checkpoint, {}
    for source, entry in zip(sources, checkpoint.tasks, strict=True):
        slots = [int(s) for s in entry.routing.slots]
        adapters[source.task] = {
            "path": f"{ADAPTERS}/{source.task}",
            "rank": max(int(p["lora_A"].shape[0]) for p in source.sites.values()),
            "slots": slots,
            "weights": list(entry.routing.weights),
            # the same slot(s) in other tasks' adapters: their tensors overlap (seq, olora...)
            "shares_slots_with": [
                other.name
                for other in checkpoint.tasks
                if other.name != source.task and set(slots) & set(other.routing.slots)
            ],
            "merged": source.record.get("merged"),  # a slot budget merged other tasks in
            "task_kind": source.record.get("kind", "classification"),
            "prompt_template": source.record.get("template"),  # "{text}": the request
        }
    largest = max(entry["rank"] for entry in adapters.values())
    return {
        "format": SERVER_FORMAT,
        "version": EXPORT_VERSION,
        "source_run": str(saved.folder.resolve()),
        "base_model_name_or_path": sources[0].backbone_path,
        "generative": sources[0].layout.generative,  # False: an encoder, heads in each adapter
        "backbone": saved.fingerprint,
        "tasks": list(adapters),  # the router's task order: index i is tasks[i]
        "adapters": adapters,
        "max_lora_rank": largest,
        "vllm_max_lora_rank": next((r for r in VLLM_RANKS if r >= largest), largest),
        "router": {"name": router.name, "rejection": router.rejection()},
        "run_config": saved.config.to_dict(),
    }


class AdapterRouter:
    """The adapter (task) name for each request text, as `predict` routes it.

    Built from a folder `export_adapters` wrote (`from_folder`): the run's frozen backbone
    computes the features its router reads, by the same code as `predict`, and the router
    picks a task per text, or rejects the text (None). Call it on a list of texts.

    Args:
        learner: A learner holding the run's backbone and configuration (no tasks needed):
            its `features` are the router's input.
        router: The run's router, on the backbone's device.
        info: The export's continual_peft.json.
        folder: The export folder.
    """

    def __init__(
        self, *, learner: ContinualLearner, router: Router, info: dict, folder: Path
    ) -> None:
        if router.num_tasks != len(info["tasks"]):
            raise ContinualPeftError(
                f"{folder}: its router knows {router.num_tasks} task(s), but {INFO_FILE} lists "
                f"{len(info['tasks'])}; the folder was altered, export the run again"
            )
        self.learner, self.router, self.info, self.folder = learner, router, info, folder
        self.tasks: list[str] = list(info["tasks"])  # index i of the router is tasks[i]
        # adapter name -> its folder, for servers that load adapters by path (LoRAX)
        self.adapters = {name: folder / entry["path"] for name, entry in info["adapters"].items()}

    @classmethod
    def from_folder(
        cls,
        folder: PathLike,
        *,
        backbone: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
    ) -> AdapterRouter:
        """Load an `export_adapters` folder, with the run's backbone (as `predict` loads it).

        Args:
            folder: The export folder.
            backbone: The run's backbone from another folder (a moved model), instead of the
                one the export names; its fingerprint is checked.
            device: Where to compute; None: CUDA when present, else the CPU (as `predict`).
            dtype: The frozen weights' dtype; None: the one the run computed in.
            batch_size: Rows per forward pass; None: the run's eval_batch_size.

        Raises:
            ContinualPeftError: Not such a folder, another format version, or a backbone that
                is not the run's.
        """
        folder = Path(folder)
        path = folder / INFO_FILE
        if not path.is_file():
            raise ContinualPeftError(
                f"{folder} holds no {INFO_FILE}: not a folder that `continual-peft export "
                f"--format {SERVER_FORMAT}` wrote"
            )
        info = load_json(path)
        if not isinstance(info, dict) or (info.get("format"), info.get("version")) != (
            SERVER_FORMAT,
            EXPORT_VERSION,
        ):
            found = (info.get("format"), info.get("version")) if isinstance(info, dict) else None
            raise ContinualPeftError(
                f"{path}: format and version {found} are not ({SERVER_FORMAT!r}, "
                f"{EXPORT_VERSION}), which this version of continual-peft reads; export the run "
                "again with this version"
            )
        config = LearnerConfig.from_dict(info["run_config"], f"{path}: run_config")
        ran = config.backbone
        # where it computes, not where it ran: as `ContinualLearner.load` for `predict`
        place = {"device": device or "", "threads": 0, "dtype": dtype or ran.dtype}
        train = config.train
        if batch_size is not None:
            train = dataclasses.replace(train, eval_batch_size=batch_size)
        settings = dataclasses.replace(ran, **place)
        config = dataclasses.replace(config, backbone=settings, train=train)
        learner = ContinualLearner(backbone or info["base_model_name_or_path"], config=config)
        check_fingerprint(info["backbone"], learner.backbone, f"export {folder}")
        router = load_router(folder / ROUTER, learner.backbone.device)
        return cls(learner=learner, router=router, info=info, folder=folder)

    def __call__(self, texts: list[str]) -> list[str | None]:
        """Each text's adapter name (its task's), or None where the router rejects the text.

        Raises:
            ContinualPeftError: `texts` is not a list of strings.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ContinualPeftError("AdapterRouter takes a list of texts, e.g. router([text])")
        if not texts:
            return []
        features = self.learner.features(list(texts), self.router.layers)  # (N, d)
        indices, _ = in_chunks(self.router.route, features)  # (N, k), -1: rejected
        return [self.tasks[t] if t >= 0 else None for t in indices[:, 0].tolist()]

    def prompt(self, name: str, text: str) -> str:
        """The request text as the adapter `name` was trained to read it: its task's prompt
        template filled in (the text itself for a task without one)."""
        if name not in self.info["adapters"]:
            raise ContinualPeftError(f"unknown adapter {name!r}; adapters: {self.tasks}")
        return fill_template(self.info["adapters"][name]["prompt_template"], text)


ROUTE_EXAMPLE = '''\
"""Which adapter of this folder serves each request: the task continual-peft's router picks for
it (as `continual-peft predict` does), or "-" where the router rejects the text (send it to the
base model, or turn it away). Needs continual-peft and the base model this folder names.

    python route.py "first request" "second request"
"""

import sys
from pathlib import Path

from continual_peft.integrations.vllm_export import AdapterRouter


def main(texts: list[str]) -> None:
    router = AdapterRouter.from_folder(Path(__file__).resolve().parent)
    for text, name in zip(texts, router(texts), strict=True):
        prompt = text if name is None else router.prompt(name, text)  # the task's template
        print(f"{name or '-'}\\t{prompt!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
'''


def _readme(info: dict, folder: Path) -> str:
    base, names = info["base_model_name_or_path"], info["tasks"]
    return (
        f"---\nlibrary_name: peft\nbase_model: {base}\n---\n\n"
        f"# {len(names)} LoRA adapters of continual-peft run {Path(info['source_run']).name}, "
        "with its router\n\n"
        f"Adapters (by task, in the router's order): {', '.join(names)}; each in "
        "`adapters/<task>/`, a peft LoRA (`adapter_config.json`, `adapter_model.safetensors`) "
        "with its own README. `router/` is the run's router; `continual_peft.json` says the "
        "rest.\n\n"
        + _route_words(info, folder)
        + _server_words(info, folder)
        + ("" if info["generative"] else _encoder_words())
        + _shared_words(info["adapters"])
        + "The adapters are checked against peft; the servers themselves are not run by "
        "continual-peft's tests.\n"
    )


def _route_words(info: dict, folder: Path) -> str:
    rejects = (info["router"]["rejection"] or {}).get("reject_rate", 0) > 0
    rejected = ", None where the router rejects it (serve the base model, or refuse)"
    rejected = rejected if rejects else ""
    return (
        "## Pick the adapter per request\n\n"
        "```python\nfrom continual_peft.integrations.vllm_export import AdapterRouter\n\n"
        f'router = AdapterRouter.from_folder("{folder}")\n'
        "names = router(texts)  # per text: a task's adapter name, or None\n```\n\n"
        f"A name is the task `continual-peft predict` routes the text to{rejected}"
        ". `router.prompt(name, text)` puts the text in that task's prompt template, as the "
        "adapter was trained to read it. `python route.py TEXT...` shows both.\n\n"
    )


def _server_words(info: dict, folder: Path) -> str:
    base, rank, count = (
        info["base_model_name_or_path"],
        info["vllm_max_lora_rank"],
        len(info["tasks"]),
    )
    return (
        "## vLLM\n\n"
        "```text\n"
        "cd <this folder>\n"
        f"vllm serve {base} --enable-lora --max-lora-rank {rank} --max-loras {count} \\\n"
        "    --lora-modules $(cat lora-modules.txt)\n```\n\n"
        "`lora-modules.txt` holds `name=adapters/name` for each adapter, relative to this "
        "folder (start vLLM in it, wherever the folder was moved or copied). "
        f"The largest rank is {info['max_lora_rank']}; "
        f"`--max-lora-rank {rank}` is the smallest value vLLM accepts at or above it. A "
        "request names its adapter as the model: `model=name` (the base model's name where the "
        "router gave None), `prompt=router.prompt(name, text)`.\n\n"
        "## LoRAX\n\n"
        f"`lorax-launcher --model-id {base}`; a request gives the adapter's folder: "
        '`"parameters": {"adapter_id": "<folder>/adapters/<name>", "adapter_source": "local"}` '
        "(`router.adapters[name]` is that folder).\n\n"
    )


def _encoder_words() -> str:
    return (
        "## An encoder\n\n"
        "The base model is an encoder: each task's answer is its head (`head.safetensors`, "
        "`labels.json` in its adapter folder) on the pooled hidden states, which a "
        "text-generation server does not compute. Load the adapters with peft instead "
        "(`PeftModel.load_adapter(path, adapter_name=name)`, `set_adapter(name)`).\n\n"
    )


def _shared_words(adapters: dict) -> str:
    shared = {n: e["shares_slots_with"] for n, e in adapters.items() if e["shares_slots_with"]}
    merged = [n for n, e in adapters.items() if e["merged"]]
    text = "## Shared slots\n\n" if shared or merged else ""
    if shared:
        listed = "; ".join(f"{n}: {', '.join(o)}" for n, o in shared.items())
        text += (
            "Some adapters hold the same trained slot(s) as others (the strategy shares them; "
            f"`shares_slots_with` in `continual_peft.json`): {listed}.\n"
        )
    if merged:
        text += (
            f"A slot budget merged other tasks' slots into the adapters of {', '.join(merged)} "
            "(`merged` in `continual_peft.json`): they are not each task's own update.\n"
        )
    return text + ("\n" if text else "")

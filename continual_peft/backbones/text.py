"""The frozen backbone: a Hugging Face encoder plus its tokenizer, loaded once, never trained.

Every weight is frozen here and nowhere else. The backbone turns texts into token ids once (with a
`max_length` cut that is counted, not hidden), pads each batch only to its own longest row, and
returns hidden states. Pooling to one vector per row lives here too, because it depends on how the
backbone lays out its tokens (a decoder backbone would score label strings instead).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from continual_peft.backbones.features import feature_depths, find_blocks, states_upto
from continual_peft.backbones.load import (
    _check_tokenizer_files,
    check_model_folder,
    default_model_path,
    family,
    load_model,
    model_name,
    quantization_for,
)
from continual_peft.backbones.placement import Placement, dtype_name
from continual_peft.backbones.quantization import (
    Quantization,
    memory_bytes,
    model_quantization,
    parameter_count,
    quantized_layers,
    quiet_expected_warnings,
)
from continual_peft.errors import ContinualPeftError

DEFAULT_BACKBONE = "all-MiniLM-L6-v2 (bundled)"
# A text longer than max_length x this many characters is tokenized through such a prefix only
PREFIX_CHARS_PER_TOKEN = 32
# config keys that say where and with what a model was loaded, not what it is
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")
# ... and, in a quantized model's config, how it was loaded (compared apart: `quantization`)
QUANTIZED_LOAD_KEYS = ("quantization_config", "dtype", "torch_dtype")

# (embeds (B, L, d), mask (B, L), position ids (B, L)) -> the same, longer, + number of tokens added
InputHook = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
]


@dataclass
class Encoded:
    """Inputs in the backbone's own form, one item per input, unbatched.

    For text, an item is a list of token ids already cut to `max_length` (padding happens per
    batch); for images, a pixel tensor.
    """

    items: list
    truncated: int  # how many inputs were longer than max_length


def check_unicode(texts: list[str], where: str = "input") -> None:
    """Refuse a text that cannot be encoded (a lone surrogate, which JSON can carry).

    Raises:
        ContinualPeftError: naming the first such text (`where` and its index) and where in it.
    """
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ContinualPeftError(
                f"{where} {i} is not valid Unicode text ({err.reason} at character "
                f"{err.start}, e.g. a lone surrogate); fix or drop it"
            ) from None


class Backbone(nn.Module):
    """A frozen Hugging Face encoder with its tokenizer.

    Args:
        model: A `transformers` model whose forward takes `input_ids`/`inputs_embeds` and
            `attention_mask` and returns `last_hidden_state`.
        tokenizer: The matching tokenizer.
        max_length: Longest input in tokens; longer inputs are cut and counted.
        name: How the model was named, for reports and fingerprints.
        device: Where to run; CUDA when present and None.
        dtype: Compute dtype of the frozen weights: "auto" (bfloat16 on a CUDA device that
            supports it, float32 elsewhere), "bfloat16", "float16" or "float32"; see
            `continual_peft.backbones.placement`. The model is cast to it.
    """

    kind = "encoder"
    padding_side = "right"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = 128,
        name: str = "custom",
        device: str | None = None,
        dtype: str = "auto",
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ContinualPeftError(f"max_length must be at least 2, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        if tokenizer is not None:
            _check_positions(model, tokenizer, max_length, name)
        self.input_hooks: list[InputHook] = []
        self.placement = Placement.of(device, dtype)
        # bitsandbytes-quantized linear layers (`backbones.quantization`), or None
        self.quantization = model_quantization(model)
        # hashed as loaded, so a run in bfloat16 and one in float32 name the same weights; a
        # quantized model, as its folder saved them (`_source_hashes`)
        self._weights_sha256, self._layers_sha256 = _source_hashes(model, self.quantization)
        # counted as loaded: module kinds later wrap layers inside the model and add their own
        self._parameter_count = parameter_count(model)
        # The one place where the backbone is frozen, moved and cast.
        self.model.requires_grad_(False)
        if self.quantization is None:
            self.model.to(device=self.placement.device, dtype=self.placement.dtype)
            self.to(self.placement.device)
        else:  # loaded in place and precision (`load_model`): it cannot be moved or cast
            _check_quantized_placement(model, self.placement, name)
        self._memory_bytes = memory_bytes(model)
        self.eval()  # inference until a training loop says otherwise

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        max_length: int = 128,
        device: str | None = None,
        dtype: str = "auto",
        quantization: Quantization | None = None,
    ) -> Backbone:
        """Load an encoder by local path or model name; None loads the bundled MiniLM offline.

        A model of another family (`backbones.load.family`: an image encoder, whose config
        has an image size and channels) loads as that family's class (`ImageBackbone`).
        With `quantization`, its linear layers load quantized (`backbones.quantization`); a
        folder saved quantized by bitsandbytes loads as it was saved.
        """
        from transformers import AutoConfig, AutoTokenizer

        path = str(default_model_path()) if name_or_path is None else name_or_path
        check_model_folder(path)
        try:
            if cls is Backbone and name_or_path is not None:
                config = AutoConfig.from_pretrained(path, local_files_only=True)
                for other in _descendants(cls):  # ImageBackbone, CausalBackbone, ...
                    if other.kind == family(config):
                        return other.from_pretrained(path, max_length, device, dtype, quantization)
            _check_tokenizer_files(path)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            quantization = quantization_for(path, quantization)
            model = load_model(path, cls.kind, quantization, Placement.of(device, dtype))
        except (OSError, ValueError) as err:
            where = (
                ""
                if Path(path).expanduser().exists()
                else (f"there is no folder {str(Path(path).expanduser().absolute())!r} and ")
            )
            raise ContinualPeftError(
                f"cannot load backbone {path!r}: {where}{err}. Give a local model folder or a "
                "model name that is already in the Hugging Face cache (this tool never downloads)."
            ) from err
        check_vocabulary(model, tokenizer, path)
        name = DEFAULT_BACKBONE if name_or_path is None else model_name(name_or_path)
        backbone = cls(
            model, tokenizer, max_length=max_length, name=name, device=device, dtype=dtype
        )
        return backbone

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen weights' compute dtype."""
        return self.placement.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def block_count(self) -> int:
        """How many blocks the features pass runs through (an encoder-decoder's: its
        encoder's), from the config."""
        return int(self.model.config.num_hidden_layers)

    @property
    def blocks(self) -> nn.ModuleList | None:
        """The model's blocks, which a shallow features pass stops in
        (`backbones.features.find_blocks`); None where they cannot be told apart."""
        return find_blocks(self.model, self.block_count)

    def feature_depths(self, layers: str | list[int]) -> list[int]:
        """The hidden-state depths a `layers` setting reads here (`backbones.features`), from
        the config's block count (an encoder-decoder's: its encoder's).

        Raises:
            ContinualPeftError: a depth the backbone does not have.
        """
        return feature_depths(layers, self.block_count, self.hidden_size)

    def feature_width(self, layers: str | list[int]) -> int:
        """How wide `embed(batch, layers)`'s features are."""
        return len(self.feature_depths(layers)) * self.hidden_size

    def encode(self, texts: list[str], where: str = "input") -> Encoded:
        """Token ids for each text, cut to `max_length`; the number of cut texts is returned too.

        Args:
            texts: The inputs.
            where: How messages name an input ("task 'agnews': train input" + its index).

        Raises:
            ContinualPeftError: For an input that is no text or has no tokens.
        """
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ContinualPeftError(
                f"{where} {bad} is a {type(texts[bad]).__name__}, not a text; this backbone "
                f"({self.name}) reads texts. Use an image backbone for images."
            )
        if not texts:
            return Encoded(items=[], truncated=0)
        check_unicode(texts, where)
        # A very long text is read through a prefix that holds far more than max_length tokens
        # (a 10 MB line is never tokenized whole); a prefix that does not is read whole.
        heads = [self._within(t) for t in texts]
        cut = self.tokenizer(heads, truncation=True, max_length=self.max_length)["input_ids"]
        empty = next((i for i, ids in enumerate(cut) if not ids), None)
        if empty is not None:
            raise ContinualPeftError(
                f"{where} {empty} ({texts[empty][:40]!r}) has no tokens for this backbone's "
                f"tokenizer ({self.name}); give every input some text"
            )
        lengths = [len(ids) for ids in self.tokenizer(heads, verbose=False)["input_ids"]]
        short = [
            i
            for i, (h, t) in enumerate(zip(heads, texts, strict=True))
            if len(h) < len(t) and lengths[i] <= self.max_length
        ]
        for i in short:  # pathological: tokens longer than PREFIX_CHARS_PER_TOKEN on average
            cut[i] = self.tokenizer(texts[i], truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            lengths[i] = len(self.tokenizer(texts[i], verbose=False)["input_ids"])
        truncated = sum(length > self.max_length for length in lengths)
        return Encoded(items=[list(ids) for ids in cut], truncated=truncated)

    def _within(self, text: str) -> str:
        """The part of `text` that is tokenized: its first (or, when the tokenizer cuts from
        the left, last) `max_length x PREFIX_CHARS_PER_TOKEN` characters."""
        reach = self.max_length * PREFIX_CHARS_PER_TOKEN
        left = getattr(self.tokenizer, "truncation_side", "right") == "left"
        return text[-reach:] if left else text[:reach]

    def item_length(self, item: list[int]) -> int:
        """An encoded input's length, for batching inputs of similar length together."""
        return len(item)

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch of id lists to its own longest row (dynamic padding), on
        `padding_side`."""
        pad_id = self.tokenizer.pad_token_id or 0
        ids, mask = pad_rows(rows, pad_id, left=self.padding_side == "left")
        return {"input_ids": self.placement.put(ids), "attention_mask": self.placement.put(mask)}

    def token_table(self) -> torch.Tensor:
        """(V, d) input embeddings that a fresh prompt is drawn from: the word embeddings."""
        return self.model.get_input_embeddings().weight

    def add_input_hook(self, hook: InputHook) -> None:
        """Let a module kind change the input embeddings (e.g. prepend virtual tokens)."""
        self.input_hooks.append(hook)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of the real tokens in the last layer, shape (B, L, d).

        Input hooks may prepend virtual tokens; their positions are cut from the output again.
        """
        inputs, added = self._model_inputs(input_ids, attention_mask)
        return self.model(**inputs).last_hidden_state[:, added:]

    def _model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The model's inputs after the input hooks (ids, or embeddings with virtual tokens),
        and how many virtual tokens they put in front."""
        if not self.input_hooks:
            return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, L, d)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        added = 0
        for hook in self.input_hooks:
            embeds, attention_mask, positions, extra = hook(embeds, attention_mask, positions)
            added += extra
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        inputs["position_ids"] = positions
        return inputs, added

    def layer_states(
        self, batch: dict[str, torch.Tensor], upto: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The real tokens' states after the embeddings (0) and after each block (1..n), each
        (B, L, d), from one forward; with `upto`, those at depths 0..upto only, from a pass
        that stops there (`backbones.features.states_upto`)."""
        inputs, added = self._model_inputs(batch["input_ids"], batch["attention_mask"])
        depth = self.block_count if upto is None else upto
        states = states_upto(
            lambda: self.model(**inputs, output_hidden_states=True), self.blocks, depth
        )
        return tuple(h[:, added:] for h in states)

    def embed(
        self, batch: dict[str, torch.Tensor], layers: str | list[int] = "last"
    ) -> torch.Tensor:
        """Pooled states of a collated batch in float32: (B, d) from the last layer, or
        (B, k·d) from the k depths of a `layers` setting side by side (`backbones.features`),
        through blocks 1..k only where the deepest depth read is k.

        Raises:
            ContinualPeftError: a depth the backbone does not have.
        """
        if layers == "last":
            return self._pool_batch(self._last_states(batch).float(), batch)
        depths = self.feature_depths(layers)
        states = self.layer_states(batch, upto=max(depths))  # a shallow pass below the last
        pooled = [self._pool_batch(states[d].float(), batch) for d in depths]
        return torch.cat(pooled, dim=1)

    def _last_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, d) last hidden states of a collated batch (`forward`)."""
        return self(batch["input_ids"], batch["attention_mask"])

    def _pool_batch(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, d) one row per input of a batch's (B, L, d) states: `pool` over its real tokens."""
        return self.pool(hidden, batch["attention_mask"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the hidden states over real (unmasked) tokens, shape (B, d)."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def fingerprint(self) -> dict[str, str]:
        """Model class, a hash of its config and a hash of a few weight tensors.

        The config hash leaves out where the model was loaded from and which transformers
        version wrote it: the same model in another folder is the same backbone.
        """
        config = self.model.config.to_dict()
        for key in VOLATILE_CONFIG_KEYS + (QUANTIZED_LOAD_KEYS if self.quantization else ()):
            config.pop(key, None)
        config_json = json.dumps(config, sort_keys=True, default=str)
        return {
            "model_class": type(self.model).__name__,
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "weights_sha256": self._weights_sha256,
            "layers_sha256": self._layers_sha256,
            "dtype": dtype_name(self.dtype),  # recorded, not compared: a run may move devices
            "quantization": self.quantization_name,
        }

    @property
    def quantization_name(self) -> str:
        """How the frozen linear weights are stored, in words: "none" (full precision) or,
        e.g., "4bit (nf4, double quantization)"."""
        return "none" if self.quantization is None else self.quantization.describe()

    def describe(self) -> dict[str, str | int]:
        """What the backbone is, for reports and `config.json`: its family (`kind`, as
        `backbones.load.family` reads it from the config), the config's model type, how many
        parameters the frozen model has (counted as loaded), the dtype it computes in, how its
        linear weights are stored (`quantization_name`) and the frozen weights' size in memory
        (bytes, as loaded: `quantization.memory_bytes`)."""
        return {
            "family": self.kind,
            "model_type": str(getattr(self.model.config, "model_type", None) or "unknown"),
            "parameters": self._parameter_count,
            "dtype": dtype_name(self.dtype),
            "quantization": self.quantization_name,
            "weights_bytes": self._memory_bytes,
        }


def _check_quantized_placement(model: nn.Module, placement: Placement, name: str) -> None:
    """Refuse a quantized model whose weights are not on `placement`'s device (it cannot be
    moved once quantized), and make its 4-bit layers compute in `placement`'s dtype."""
    devices = {p.device for p in model.parameters()}
    wrong = [d for d in devices if d.type != placement.device.type]
    if wrong:
        raise ContinualPeftError(
            f"backbone {name!r} was quantized on {wrong[0]}, but it is to run on "
            f"{placement.device}; a quantized model cannot be moved: load it on that device "
            "(Backbone.from_pretrained(..., device=...), or --device)"
        )
    quiet_expected_warnings()
    for layer in quantized_layers(model):
        if hasattr(layer, "compute_dtype"):  # 4-bit: the precision policy's dtype
            layer.compute_dtype = placement.dtype


def _source_hashes(model: nn.Module, quantization: Quantization | None) -> tuple[str, str]:
    """(weights, layers) hashes that name the model. A full-precision model: its state tensors
    as loaded. A quantized one: its folder's safetensors files as saved (`folder_hashes`; the
    folder its config names, `_name_or_path`), since the quantized values are what this
    bitsandbytes build made of the weights and the folder's are the model itself, the same on
    every device and build, and a model quantized in memory and one loaded quantized by name
    match; its quantized state only where no such folder is known."""
    if quantization is not None:
        source = str(getattr(model.config, "_name_or_path", "") or "")
        hashes = folder_hashes(source) if source and Path(source).is_dir() else None
        if hashes is not None:
            return hashes
    return _weights_hash(model), _layers_hash(model)


def folder_hashes(path: str, values: int = 256) -> tuple[str, str] | None:
    """(weights, layers) hashes of a model folder's safetensors files as saved, in the manner
    of `_weights_hash` and `_layers_hash` (the first four tensors; every tensor's name and
    first `values` values, in float32), read lazily (`safetensors.safe_open`); None for a
    folder without safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    if not files:
        return None
    weights, layers, seen = hashlib.sha256(), hashlib.sha256(), 0
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as tensors:
            for key in sorted(tensors.keys()):
                part = tensors.get_slice(key)
                shape = part.get_shape()
                rows = -(-values // max(1, math.prod(shape[1:]))) if shape else 0
                head = (part[:rows] if shape else tensors.get_tensor(key)).reshape(-1)[:values]
                data = head.float().numpy().tobytes()
                if seen < 4:
                    weights.update(data)
                    seen += 1
                _add_layer(layers, key, data)
    return weights.hexdigest()[:16], layers.hexdigest()[:16]


def _descendants(cls: type) -> list[type]:
    """Every subclass of `cls`, at any depth (each family's class, `backbones.load.family`)."""
    return [d for sub in cls.__subclasses__() for d in (sub, *_descendants(sub))]


def _weights_hash(model: nn.Module) -> str:
    """A hash of the first four state tensors as loaded (before any cast), in float32."""
    weights = hashlib.sha256()
    for _, tensor in list(model.state_dict().items())[:4]:
        weights.update(tensor.detach().float().cpu().numpy().tobytes())
    return weights.hexdigest()[:16]


def _layers_hash(model: nn.Module, values: int = 256) -> str:
    """A hash of every state tensor's name and first `values` values, as loaded, in float32:
    models whose embeddings agree but whose deeper layers differ (a fine-tune) are told apart,
    for the cost of reading a few values per tensor."""
    layers = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values_read = tensor.detach().reshape(-1)[:values].float().cpu().numpy().tobytes()
        _add_layer(layers, name, values_read)
    return layers.hexdigest()[:16]


def _add_layer(layers, name: str, values: bytes) -> None:
    """Add a tensor's name and first values to the layers hash, unless it is a head a model
    folder may leave to chance (a pooler, an LM head)."""
    if "pooler" in name or "lm_head" in name:
        return
    layers.update(name.encode())
    layers.update(values)


# One of these holds a tokenizer's vocabulary (WordPiece, BPE, SentencePiece, fast tokenizers).
def check_vocabulary(model: nn.Module, tokenizer, path: str) -> None:
    """Refuse a tokenizer that does not fit the model's token embeddings.

    More token ids than embedding rows index past the table; fewer than half the rows means
    another model's tokenizer (models pad their tables a little, never by half).
    """
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:
        raise ContinualPeftError(
            f"backbone {path!r} ({type(model).__name__}) has no single token-embedding table: "
            "it is no text encoder or language model this tool reads (e.g. a CLIP-style "
            "multi-modal model); give a BERT-like, ViT, decoder-only or encoder-decoder folder"
        ) from None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    size = len(tokenizer)
    if size > rows or size < rows // 2:
        raise ContinualPeftError(
            f"backbone {path!r}: its tokenizer has {size} tokens but the model has {rows} token "
            "embeddings; the tokenizer files are not this model's. Save the model's own "
            "tokenizer beside it."
        )


def pad_rows(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) int64 ids padded with `value` to the longest row, on the left or the right,
    and the (B, width) mask of real entries; built on the CPU from Python lists (the caller
    copies each to the device once)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device="cpu")
        mask[i, span] = 1
    return ids, mask


def position_limit(model: nn.Module, tokenizer) -> int | None:
    """The most positions `model` can embed: its position embeddings, or its tokenizer's
    stated maximum when that is lower (as for RoBERTa's offset positions); None if neither
    says (relative positions)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and stated < 1_000_000:  # an unknown maximum is a huge sentinel
        limit = stated if limit is None else min(limit, stated)
    return limit


def _check_positions(model: nn.Module, tokenizer, max_length: int, name: str) -> None:
    """Refuse a max_length beyond what the model can embed (`position_limit`)."""
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise ContinualPeftError(
            f"max_length {max_length} exceeds what backbone {name!r} can read ({limit} "
            f"positions); use --max-length {limit} or less"
        )

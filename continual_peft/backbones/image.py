"""The frozen image backbone: a ViT-family `transformers` encoder plus an optional image processor.

Same engine interface as the text `Backbone` (encode → items, collate → batch, embed → pooled
features), so slots, heads, routers and the monitor work on images unchanged:

- `encode` turns each image into one float tensor (C, H, W). With an image processor
  (`AutoImageProcessor`) it accepts PIL images and numpy arrays / torch tensors shaped (H, W),
  (H, W, C) or (C, H, W) and lets the processor resize and normalise them; without one (the
  tensor path) it takes float arrays / tensors already shaped (C, H, W), or (H, W) for one
  channel, and checks them against the model's `num_channels` and `image_size`.
- Every image has the same length, so batching needs no padding and nothing is ever truncated.
- `embed` mean-pools the last hidden states over every real token (CLS, patches and any other
  leading tokens the model adds). Why the mean rather than CLS: the backbone is frozen and never
  fine-tuned, and a frozen ViT's CLS state is a weaker, pre-training-specific summary (linear
  probes of MAE/DINOv2-style encoders use averaged patch tokens); the mean also lets every patch
  token's module delta reach the head, and gives routers the same kind of feature as the text
  backbone.

Every module kind works here. LoRA wraps the attention projections (`q_proj`/`v_proj` in
transformers 5's ViT family, which the default targets `query`/`value` name), adapters wrap the
attention and MLP output projections (`o_proj`, `mlp.fc2`), prefixes wrap `layers.N.attention`,
and prompts are inserted after the leading tokens (CLS) by `forward` (visual prompt tuning,
"VPT-shallow").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from continual_peft.backbones.features import states_upto
from continual_peft.backbones.load import family, load_model, model_name, quantization_for
from continual_peft.backbones.placement import CPU, Placement
from continual_peft.backbones.quantization import Quantization
from continual_peft.backbones.text import Backbone, Encoded
from continual_peft.errors import ContinualPeftError


def is_vision_config(config) -> bool:
    """Whether a `transformers` config describes an image encoder (`backbones.load.family`)."""
    return family(config) == "image"


class ImageBackbone(Backbone):
    """A frozen ViT-family encoder (forward takes `pixel_values`, returns `last_hidden_state`).

    Args:
        model: A `transformers` vision model with an `embeddings` module that produces the token
            sequence (ViTModel, DeiTModel, Dinov2Model, BeitModel, ...).
        processor: An image processor that resizes and normalises images; None for the tensor
            path (inputs already shaped and normalised).
        max_length: Unused for images (kept so both backbones load alike).
        name: How the model was named, for reports and fingerprints.
        device: Where to run; automatic when None.
        dtype: Compute dtype of the frozen weights (see `Backbone`).
    """

    kind = "image"

    def __init__(
        self,
        model: nn.Module,
        processor=None,
        max_length: int = 128,
        name: str = "custom",
        device: str | None = None,
        dtype: str = "auto",
    ) -> None:
        super().__init__(model, None, max_length=max_length, name=name, device=device, dtype=dtype)
        self.processor = processor
        config = model.config
        size = config.image_size
        self.image_shape = (int(config.num_channels), *_pair(size))  # (C, H, W)
        patch = _pair(config.patch_size)
        self.num_patches = (self.image_shape[1] // patch[0]) * (self.image_shape[2] // patch[1])

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        max_length: int = 128,
        device: str | None = None,
        dtype: str = "auto",
        quantization: Quantization | None = None,
    ) -> ImageBackbone:
        """Load `AutoModel` (and `AutoImageProcessor`, when the folder has one) offline; with
        `quantization`, its linear layers quantized (`backbones.quantization`)."""
        from transformers import AutoImageProcessor

        if name_or_path is None:
            raise ContinualPeftError("an image backbone needs a model folder or name")
        path = name_or_path
        try:
            quantization = quantization_for(path, quantization)
            model = load_model(path, "image", quantization, Placement.of(device, dtype))
            processor = None
            if not Path(path).is_dir() or (Path(path) / "preprocessor_config.json").is_file():
                processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise ContinualPeftError(
                f"cannot load image backbone {path!r}: {err}. Give a local model folder or a "
                "model name that is already in the Hugging Face cache (this tool never downloads)."
            ) from err
        return cls(
            model,
            processor,
            max_length=max_length,
            name=model_name(name_or_path),
            device=device,
            dtype=dtype,
        )

    def encode(self, images: list, where: str = "input") -> Encoded:
        """One float tensor (C, H, W) per image; nothing is truncated.

        Args:
            images: PIL images, arrays or tensors.
            where: How messages name an input ("task 'digits': train input" + its index).

        Raises:
            ContinualPeftError: For a text, a wrong shape or dtype, or NaN/infinite pixels.
        """
        bad = next((i for i, x in enumerate(images) if isinstance(x, str)), None)
        if bad is not None:
            raise ContinualPeftError(
                f"{where} {bad} is a text; this backbone ({self.name}) reads images "
                "(PIL images, numpy arrays or torch tensors). Use a text backbone for texts."
            )
        if not images:
            return Encoded(items=[], truncated=0)
        if self.processor is None:
            items = [self._tensor(i, x) for i, x in enumerate(images)]
        else:
            pixels = self.processor(images=[_for_processor(x) for x in images], return_tensors="pt")
            pixels = pixels["pixel_values"].float()  # (N, C, H, W)
            if tuple(pixels.shape[1:]) != self.image_shape:
                raise ContinualPeftError(
                    f"the image processor gives images of shape {tuple(pixels.shape[1:])}, the "
                    f"model ({self.name}) needs {self.image_shape}; set the processor's size (and "
                    "image mean/std per channel) to the model's image_size and num_channels"
                )
            items = list(pixels)
        broken = [i for i, x in enumerate(items) if not bool(torch.isfinite(x).all())]
        if broken:
            raise ContinualPeftError(
                f"{where} {broken[0]} has NaN or infinite pixel values ({len(broken)} such "
                f"input(s) of {len(items)}); fix or drop them: no model can learn from them"
            )
        return Encoded(items=items, truncated=0)

    def _tensor(self, index: int, image) -> torch.Tensor:
        """The tensor path: check and convert one already-prepared image."""
        channels, height, width = self.image_shape
        fix = (
            f"Resize and normalise images to ({channels}, {height}, {width}) floats first, or "
            "give the backbone an image processor (a model folder with preprocessor_config.json)."
        )
        if not isinstance(image, np.ndarray | torch.Tensor):
            raise ContinualPeftError(
                f"image {index} is a {type(image).__name__}; without an image processor this "
                f"backbone ({self.name}) takes numpy arrays or torch tensors. {fix}"
            )
        tensor = torch.as_tensor(image, device=CPU)  # moved with the batch, later
        if not tensor.is_floating_point():
            raise ContinualPeftError(
                f"image {index} has dtype {tensor.dtype}; without an image processor this "
                f"backbone ({self.name}) takes float pixels, already normalised. {fix}"
            )
        given = tuple(tensor.shape)
        if tensor.dim() == 2 and channels == 1:
            tensor = tensor[None]
        if tuple(tensor.shape) != self.image_shape:
            raise ContinualPeftError(
                f"image {index} has shape {given}; without an image processor this "
                f"backbone ({self.name}) takes ({channels}, {height}, {width})"
                f"{f' or ({height}, {width})' if channels == 1 else ''}. {fix}"
            )
        return tensor.detach().float().cpu().contiguous()

    def item_length(self, item: torch.Tensor) -> int:
        """Every image is the same length: batching never pads."""
        return 1

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        pixels = torch.stack(rows)  # (B, C, H, W) float32 on the CPU
        return {"pixel_values": self.placement.put(pixels, self.dtype)}

    def token_table(self) -> torch.Tensor:
        """The tokens of a blank (all-zero) image, (S + P, d): what a fresh prompt is drawn from."""
        blank = torch.zeros(1, *self.image_shape, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return self.model.embeddings(blank)[0].detach()  # (S + P, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden states of the real tokens in the last layer, shape (B, L, d).

        Input hooks (prompts) get the patch tokens after the model's leading tokens (CLS, ...)
        and may prepend virtual tokens to them; their positions are cut from the output again.
        """
        return self._states(pixel_values)[-1]

    def _states(
        self, pixel_values: torch.Tensor, upto: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The real tokens' last states, or (with `upto`) those after the embeddings (0) and
        after blocks 1..upto, from a pass that stops there (`backbones.features.states_upto`),
        each (B, L, d)."""
        if not self.input_hooks:
            return self._run(
                lambda **options: self.model(pixel_values=pixel_values, **options), upto
            )
        tokens = self.model.embeddings(pixel_values)  # (B, S + P, d), positions already added
        lead = tokens.shape[1] - self.num_patches  # S leading tokens (CLS, distillation, ...)
        patches = tokens[:, lead:]  # (B, P, d)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        positions = torch.arange(patches.shape[1], device=patches.device).expand_as(mask)
        added = 0
        for hook in self.input_hooks:
            patches, mask, positions, extra = hook(patches, mask, positions)
            added += extra
        full = torch.cat([tokens[:, :lead], patches], dim=1)  # (B, S + N + P, d)
        lead_mask = torch.ones(mask.shape[0], lead, dtype=mask.dtype, device=mask.device)
        full_mask = torch.cat([lead_mask, mask], dim=1)  # (B, S + N + P)
        # The model computes its embeddings again; the hook swaps in ours (one patch projection).
        handle = self.model.embeddings.register_forward_hook(lambda *_: full)
        try:
            states = self._run(
                lambda **options: self.model(
                    pixel_values=pixel_values, attention_mask=full_mask, **options
                ),
                upto,
            )
        finally:
            handle.remove()
        return tuple(torch.cat([h[:, :lead], h[:, lead + added :]], dim=1) for h in states)

    def _run(self, forward, upto: int | None) -> tuple[torch.Tensor, ...]:
        """`forward(**options)`'s last hidden states alone (`upto` None), or its states at
        depths 0..upto."""
        if upto is None:
            return (forward().last_hidden_state,)
        return states_upto(lambda: forward(output_hidden_states=True), self.blocks, upto)

    def layer_states(
        self, batch: dict[str, torch.Tensor], upto: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The real tokens' states after the embeddings (0) and each block (1..n), (B, L, d);
        with `upto`, those at depths 0..upto only, from a pass that stops there."""
        depth = self.block_count if upto is None else upto
        return self._states(batch["pixel_values"], upto=depth)

    def _last_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["pixel_values"])

    def _pool_batch(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over every real token (see the module docstring): images have no padding."""
        return hidden.mean(dim=1)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, list | tuple) else (value, value)


def _for_processor(image):
    """What an image processor accepts: PIL as-is, arrays with an explicit channel axis."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 2:
        return image[:, :, None]  # (H, W) -> (H, W, 1): processors need a channel axis
    return image

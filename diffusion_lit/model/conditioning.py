"""What the denoiser is conditioned on, a part that a config names (`model.conditioning`): nothing (left out: the
plain case), class labels (`Labels`) or text prompts (`Prompts`, with a text encoder of `diffusion_lit.nets.text`).

A conditioning owns the null condition of classifier-free guidance, the dropping of conditions in training, the
text encoder's EMA, and which conditions a sample grid shows. Labels and prompts exclude each other by construction:
a model has one conditioning.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError
from diffusion_lit.nets.frozen import Frozen
from diffusion_lit.model.ema import PowerEMA, averaged
from diffusion_lit.nets.unet import null_labels


def check_p_uncond(p_uncond: float) -> None:
    """A UserError unless the probability of dropping a condition lies in [0, 1]."""
    if not 0.0 <= p_uncond <= 1.0:
        raise UserError(f"p_uncond must lie in [0, 1], got {p_uncond}")


class Unconditional(nn.Module):
    """No condition: the plain case, and what every conditioning does unless it says otherwise."""

    num_classes = 0  # the classes the network embeds (besides the null one)
    captions = False  # the data must serve captions
    conditional = False  # classifier-free guidance has a null condition to guide away from

    def bind(self, num_classes: int, ema_decay: float | PowerEMA | None, ema_warmup: bool | float) -> None:
        """Sets the part up for the module's data and EMA settings."""

    def net_kwargs(self) -> dict:
        """What the networks take besides (in_channels, image_size, num_classes)."""
        return {}

    def drop(self, y):
        """Training's conditions, some dropped to the null one (classifier-free guidance)."""
        return None

    def condition(self, y, ema: bool = True) -> Tensor | None:
        """What the network is given as y for a batch's labels or prompts (an unconditional model ignores them)."""
        return None

    def null(self, ema: bool = True) -> Tensor | None:
        """The null condition of classifier-free guidance as features [1, L, D] (None: the null label, or none)."""
        return None

    def null_rows(self, y, ema: bool = True) -> tuple[Tensor, Tensor] | None:
        """For a batch's conditions as `drop` left them: the null condition for every row, as `condition` gives
        conditions, and a bool [B] of the rows already dropped to it (None: there is no null condition)."""
        return None

    def rows(self, prompts: Sequence[str] | None, datamodule) -> list | None:
        """The conditions of a sample grid's rows (None: one unconditional grid)."""
        return None

    def batch(self, items: list, device) -> Tensor | list:
        """A list of rows' conditions as `condition` takes them."""
        return items

    def trained(self) -> list[nn.Parameter]:
        """The parameters trained with the denoiser."""
        return []

    def update_ema(self) -> None:
        """Moves the averaged copies after an optimizer step."""

    def spec(self) -> dict:
        """What a guide must share with the model."""
        return {"classes": self.num_classes}

    def check_data(self, captions: bool) -> None:
        """A UserError when the data serves what this conditioning does not read."""
        if captions:
            raise UserError("the data serves captions (data.captions true) but the model reads no prompts: set "
                            "--model.conditioning Prompts (with an encoder), or leave data.captions false")


class Labels(Unconditional):
    """Class labels, one learned embedding each, plus the null class (index num_classes) of classifier-free
    guidance.

    Args:
        p_uncond: the probability that a training label is dropped to the null class.
    """

    conditional = True

    def __init__(self, p_uncond: float = 0.1) -> None:
        super().__init__()
        check_p_uncond(p_uncond)
        self.p_uncond = p_uncond
        self.num_classes = 0  # set by bind, from the data

    def bind(self, num_classes: int, ema_decay: float | PowerEMA | None, ema_warmup: bool | float) -> None:
        if num_classes < 1:
            raise UserError("class conditioning (Labels) needs labelled data: MNIST, CIFAR-10, or a folder with one "
                            "sub-folder per class")
        self.num_classes = num_classes

    def drop(self, y: Tensor) -> Tensor:
        drop = torch.rand(len(y), device=y.device) < self.p_uncond
        return torch.where(drop, null_labels(self.num_classes, y), y)

    def condition(self, y, ema: bool = True) -> Tensor | None:
        if y is not None and not isinstance(y, Tensor):
            raise UserError("this model reads class labels, not prompts: give it --labels")
        return y

    def null_rows(self, y: Tensor, ema: bool = True) -> tuple[Tensor, Tensor]:
        return null_labels(self.num_classes, y), y == self.num_classes

    def rows(self, prompts: Sequence[str] | None, datamodule) -> list:
        return list(range(self.num_classes))

    def batch(self, items: list, device) -> Tensor:
        return torch.tensor(items, device=device)


class Prompts(Unconditional):
    """Text prompts, encoded to features [B, L, D] that the denoiser attends to (cross-attention); the empty prompt is
    the null condition.

    Args:
        encoder: the text encoder: `diffusion_lit.nets.text.ByteTextEncoder` (trained with the denoiser, and averaged
            with it) or `diffusion_lit.nets.text.CLIPText` (a local CLIP folder, frozen).
        p_uncond: the probability that a training caption is dropped to the empty prompt.
        cache: with a frozen encoder, encode each distinct caption once and keep its features in host memory.
    """

    captions = True
    conditional = True

    def __init__(self, encoder: nn.Module, p_uncond: float = 0.1, cache: bool = False) -> None:
        super().__init__()
        check_p_uncond(p_uncond)
        if cache and encoder.trainable:
            raise UserError("cache is for a frozen text encoder (CLIPText); a trained one's features change each step")
        self.p_uncond = p_uncond
        self.width = encoder.width
        # A trained encoder's weights are saved; a frozen one is read from its own files again.
        self.encoder = encoder if encoder.trainable else None
        self.frozen = Frozen(encoder=encoder) if not encoder.trainable else None
        self.ema: nn.Module | None = None
        self.text_cache: dict[str, Tensor] | None = {} if cache else None

    def bind(self, num_classes: int, ema_decay: float | PowerEMA | None, ema_warmup: bool | float) -> None:
        if self.encoder is not None and ema_decay is not None:
            self.ema = averaged(self.encoder, ema_decay, ema_warmup)

    def net_kwargs(self) -> dict:
        return {"context_dim": self.width}

    def drop(self, y: Sequence[str]) -> list[str]:
        drop = torch.rand(len(y), device=self.device()) < self.p_uncond
        return ["" if dropped else prompt for prompt, dropped in zip(y, drop.tolist())]

    def device(self) -> torch.device:
        """Where the encoder's weights are (the model's device)."""
        return next((self.frozen or self.encoder).parameters()).device

    def encode(self, prompts: Sequence[str], ema: bool = True) -> Tensor:
        """Text features [B, L, width] of the prompts (the averaged encoder's, with `ema`)."""
        encoder = (self.frozen["encoder"] if self.frozen is not None else
                   self.ema.module if ema and self.ema is not None else self.encoder)
        return encoder(encoder.tokenize(list(prompts)).to(self.device()))

    def condition(self, y, ema: bool = True) -> Tensor | None:
        if y is None:
            return None
        if isinstance(y, Tensor):
            raise UserError("this model reads prompts, not labels: give it captions (--data.captions true) or "
                            "prompts (--prompt)")
        # With `cache`, each distinct prompt is encoded once in training (not under inference mode, whose tensors
        # could not be used in training later).
        if self.text_cache is None or torch.is_inference_mode_enabled():
            return self.encode(y, ema)
        new = [p for p in dict.fromkeys(y) if p not in self.text_cache]
        if new:  # kept in host memory (77 x 768 floats, 236 kB a caption for SD 1.x), brought over per batch
            self.text_cache.update(zip(new, self.encode(new, ema).cpu()))
        return torch.stack([self.text_cache[p] for p in y]).to(self.device())

    def null(self, ema: bool = True) -> Tensor:
        return self.encode([""], ema)

    def null_rows(self, y: Sequence[str], ema: bool = True) -> tuple[Tensor, Tensor]:
        features = self.null(ema)
        return features.expand(len(y), *features.shape[1:]), torch.tensor([p == "" for p in y], device=features.device)

    def rows(self, prompts: Sequence[str] | None, datamodule) -> list[str]:
        if prompts:
            return list(prompts)
        return datamodule.example_prompts(8) if datamodule is not None else [""]

    def trained(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) if self.encoder is not None else []

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.encoder)

    def spec(self) -> dict:
        return {"classes": 0, "text encoder": type(self.frozen["encoder"] if self.frozen else self.encoder).__name__}

    def check_data(self, captions: bool) -> None:
        if not captions:
            raise UserError("the model reads prompts (model.conditioning Prompts) but the data serves labels: add "
                            "--data.captions true")

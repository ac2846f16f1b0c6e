"""Text encoders for prompt conditioning: a small byte-level transformer trained with the denoiser (no vocabulary
file, no download), or a frozen CLIP text model read with `transformers` from a local folder (SD 1.x's).

Each maps a list of prompts to the tokens' features [B, L, width], which the denoiser attends to. The empty prompt
is the unconditional one: classifier-free guidance contrasts a prompt with it.
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.core.optional import need
from diffusion_lit.core.trust import pickle_refusal, pickled_weights, refused_pickle


def say_cut(encoder: nn.Module, lengths: list[int], unit: str) -> None:
    """Once per encoder: how many prompts are longer than it reads (they are cut)."""
    cut = sum(n > encoder.max_length for n in lengths)
    if cut and not getattr(encoder, "said_cut", False):
        encoder.said_cut = True
        say(f"{cut} of {len(lengths)} prompts are longer than the text encoder reads ({encoder.max_length} {unit}) "
            "and are cut; raise the encoder's max_length to keep them whole (said once)")


def byte_tokens(prompts: list[str], length: int) -> Tensor:
    """UTF-8 bytes shifted by one, cut or padded with 0 to `length`: [B, length] int64."""
    tokens = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        data = list(prompt.encode("utf-8"))[:length]
        tokens[row, : len(data)] = torch.tensor(data, dtype=torch.long) + 1
    return tokens


class ByteTextEncoder(nn.Module):
    """Bytes -> a few transformer layers -> features [B, max_length, width], trained with the denoiser.

    Args:
        width: the features' width.
        depth: transformer layers.
        heads: attention heads; unset, width / 32.
        max_length: bytes of a prompt it reads (the rest is cut).

    Padding is a token like any other (SD 1.x attends over CLIP's padding too), so the empty prompt has features
    of its own.
    """

    trainable = True

    def __init__(self, width: int = 128, depth: int = 2, heads: int | None = None, max_length: int = 32) -> None:
        super().__init__()
        heads = heads or max(1, width // 32)
        if width % heads:
            raise UserError(f"the text encoder's width {width} must be divisible by its heads ({heads})")
        self.width, self.max_length = width, max_length
        self.embed = nn.Embedding(257, width)
        self.pos = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def tokenize(self, prompts: list[str]) -> Tensor:
        say_cut(self, [len(p.encode("utf-8")) for p in prompts], "bytes")
        return byte_tokens(prompts, self.max_length)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.layers(self.embed(tokens) + self.pos))


class CLIPText(nn.Module):
    """A frozen CLIP text model and its tokenizer from a local folder (`save_pretrained`'s, or SD's `text_encoder`
    and `tokenizer` sub-folders beside each other): features are the last hidden states over the padded tokens."""

    trainable = False

    def __init__(self, folder: str) -> None:
        super().__init__()
        transformers = need("transformers")
        root = Path(folder).expanduser()
        self.folder = str(root.resolve())
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        if not (model_dir / "config.json").is_file():
            raise UserError(f"CLIPText {folder}: no CLIP text model there (config.json is missing); give a folder "
                            "written by save_pretrained, or use ByteTextEncoder, a text encoder trained with the denoiser")
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
            self.model = transformers.CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as err:
            if refused_pickle(err):  # torch's text advises loading it with weights_only=False: never passed on
                weights = pickled_weights(model_dir, "pytorch_model.bin")
                raise pickle_refusal(
                    f"CLIPText {folder}", weights, "model.safetensors",
                    "transformers.CLIPTextModel.from_pretrained(None, config=transformers.CLIPTextConfig."
                    f"from_pretrained({str(model_dir)!r}), state_dict=torch.load({str(weights)!r}, weights_only=False))"
                    f".save_pretrained({str(model_dir)!r})") from None
            raise UserError(f"CLIPText {folder} could not be loaded as a CLIP text model ({reason(err)})") from None
        self.model.requires_grad_(False).eval()
        self.width = self.model.config.hidden_size
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def tokenize(self, prompts: list[str]) -> Tensor:
        if not getattr(self, "said_cut", False):
            say_cut(self, [len(ids) for ids in self.tokenizer(prompts).input_ids], "tokens")
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).last_hidden_state

    def train(self, mode: bool = True) -> "CLIPText":
        return super().train(False)  # frozen: always in eval mode

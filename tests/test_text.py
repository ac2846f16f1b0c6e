"""Text prompts: captions from a folder, text encoders, cross-attention, guidance against the empty prompt, and the
`sample --prompt` command."""

import json
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from diffusion_lit.model.conditioning import Prompts
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.data.digits import PHRASINGS, WORDS, digit_caption
from diffusion_lit.nets.dit import DiT
from diffusion_lit.core.errors import UserError
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import MeanFlow
from diffusion_lit.model.process import VP, Flow
from diffusion_lit.sampling.samplers import guided, sample
from diffusion_lit.data.sources import ImageFolder, ShippedDigits
from diffusion_lit.nets.text import ByteTextEncoder, CLIPText, byte_tokens

from conftest import assert_halves_its_loss, bars, tiny_unet, write_image_folder
from test_cli import cli

tiny_dit = partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def text_module(net=tiny_unet, **kwargs) -> DiffusionModule:
    return DiffusionModule(net, image_size=8, channels=1,
                           conditioning=Prompts(ByteTextEncoder(width=32, max_length=16)), **kwargs)


def test_both_caption_conventions_are_read(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", n_per_class=2)  # a/000.png, a/001.png, b/000.png, b/001.png
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a/000.png", "text": "a bright bar"}) + "\n\n"
                                         + json.dumps({"file_name": "b/001.png", "text": "a low bar"}) + "\n")
    (root / "a" / "001.txt").write_text("from a text file\n")
    data = DiffusionDataModule(ImageFolder(str(root)), batch_size=1, num_workers=0, val_fraction=0.0, captions=True)
    assert data.source.captions == ["a bright bar", "from a text file", "", "a low bar"]
    assert "1 of 4 images" in capsys.readouterr().err  # b/000.png: the empty prompt, said once
    data.setup("fit")
    image, caption = data.train_set.dataset[1]
    assert image.shape == (1, 8, 8) and caption == "from a text file"


def test_missing_or_broken_captions_are_clear_errors(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=2)
    with pytest.raises(UserError, match="no captions in .*metadata.jsonl"):
        DiffusionDataModule(ImageFolder(str(root)), captions=True)
    (root / "metadata.jsonl").write_text('{"file_name": "a/000.png"}\n')
    with pytest.raises(UserError, match="line 1: each line must be a JSON object with \"file_name\" and \"text\""):
        DiffusionDataModule(ImageFolder(str(root)), captions=True)


def test_digits_are_captioned_from_their_labels():
    data = DiffusionDataModule(ShippedDigits(), batch_size=8, num_workers=0, captions=True)
    data.setup("fit")
    _, labels = data.train_set.dataset.dataset.images, data.train_set.dataset.dataset.labels
    for i in data.train_set.indices[:12]:
        caption = data.train_set.dataset[i][1]
        label = int(labels[i])
        assert caption == digit_caption(label, i) and (str(label) in caption or WORDS[label] in caption)
    assert {digit_caption(7, i) for i in range(len(PHRASINGS))} == {
        "7", "seven", "the digit 7", "the digit seven", "a handwritten seven", "a handwritten 7"}
    assert len(data.example_prompts(5)) == 5


def test_bytes_are_tokens():
    tokens = byte_tokens(["ab", "", "é"], 4)
    assert tokens.tolist() == [[98, 99, 0, 0], [0, 0, 0, 0], [196, 170, 0, 0]]  # UTF-8 bytes + 1, 0 pads
    assert byte_tokens(["abcdef"], 4).tolist() == [[98, 99, 100, 101]]


def perturb(net: torch.nn.Module) -> None:
    """Random weights everywhere, the zero-initialised output layers included."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("net", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_cross_attention_follows_the_prompt_and_guidance_mixes_the_two_passes(net):
    torch.manual_seed(0)
    model = text_module(net)
    perturb(model.net)
    perturb(model.conditioning.encoder)
    model.conditioning.ema.module.load_state_dict(model.conditioning.encoder.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        seven, three, empty = (model.conditioning.encode([p, p]) for p in ("seven", "three", ""))
        out_seven, out_three, out_empty = (model.net(x, t, c) for c in (seven, three, empty))
        assert (out_seven - out_three).abs().max() > 1e-3  # the output changes with the prompt
        null = model.conditioning.null()
        # The null condition is the empty prompt's features, encoded alone; here it sits in a batch of two, which
        # takes other matrix-product kernels on some CPUs: equal to float32 rounding, not bit for bit.
        torch.testing.assert_close(null[0], empty[0], rtol=1e-5, atol=1e-6)
        for w, expected in [(0.0, out_empty), (1.0, out_seven), (3.0, out_empty + 3 * (out_seven - out_empty))]:
            torch.testing.assert_close(guided(model.net, seven, w, null)(x, t), expected, atol=1e-5, rtol=1e-5)
        # Without prompts a text model samples from the empty prompt: guidance then changes nothing.
        x_T = torch.randn(2, 1, 8, 8)
        for sampler in ("ddim", "euler", "heun", "dpmpp_2m"):  # every solver takes prompts the same way
            draw = lambda **kw: sample(model.net, model.process, x_T, sampler, 3, null=null, **kw)  # noqa: E731
            # D + 4 (D - D) is D up to rounding: the guided pass is a batch of 4, not 2 (other kernels, eps a few
            # 1e-7 apart), and the noisiest step's x0 = (x_t - sigma eps) / alpha multiplies that by sigma / alpha
            # (~160 on the linear schedule). Seen here: up to 5e-4.
            empty_alone = null.expand(2, *null.shape[1:])
            torch.testing.assert_close(draw(), draw(labels=empty_alone, guidance_scale=4.0), atol=2e-3, rtol=1e-3)
            assert (draw(labels=seven, guidance_scale=2.0) - draw()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="attends to text features"):
        model.net(x, t)


def test_tiny_text_model_halves_its_loss_on_eight_captioned_images():
    captions = [f"a bar in row {i}" for i in range(8)]
    loader = DataLoader(list(zip(bars(), captions)), batch_size=8)
    model = text_module(optimizer=partial(torch.optim.Adam, lr=2e-3), process=VP("cosine"))
    assert_halves_its_loss(model, loader)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.conditioning.encoder.parameters())


def test_labels_and_prompts_exclude_each_other():
    # A model has one conditioning: a text model on labelled data embeds no classes and refuses labels.
    model = DiffusionModule(tiny_unet, image_size=8, channels=1, num_classes=2,
                            conditioning=Prompts(ByteTextEncoder(width=32)))
    assert model.conditioning.num_classes == 0 and model.net.class_emb is None
    with pytest.raises(UserError, match="reads prompts, not labels"):
        model.conditioning.condition(torch.tensor([0, 1]))


def write_tiny_clip(folder) -> None:
    """A CLIP text model of two layers and a tokenizer whose vocabulary is the 256 byte characters (no merges),
    saved as `save_pretrained` does: what SD's text_encoder / tokenizer folders hold, in miniature."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    config = transformers.CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=512,
                                         eos_token_id=513, pad_token_id=513)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(folder / "text_encoder"))


def test_a_local_clip_text_model_loads_through_text_encoder(tmp_path):
    write_tiny_clip(tmp_path / "clip")
    model = DiffusionModule(tiny_unet, image_size=8, channels=1, conditioning=Prompts(CLIPText(str(tmp_path / "clip"))))
    assert isinstance(model.conditioning.frozen["encoder"], CLIPText) and model.conditioning.encoder is None
    features = model.conditioning.encode(["seven", "a handwritten 7"])
    assert features.shape == (2, 16, 32)
    assert not torch.equal(features[0], features[1])
    assert not any(p.requires_grad for p in model.conditioning.frozen.parameters())
    assert not any("frozen." in k for k in model.state_dict())  # read from its folder, not saved again
    loaded = DiffusionModule(tiny_unet, image_size=8, channels=1, conditioning=Prompts(CLIPText(str(tmp_path / "clip"))))
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(loaded.conditioning.encode(["seven"]), features[:1])
    with pytest.raises(UserError, match="config.json is missing"):
        DiffusionModule(tiny_unet, image_size=8, channels=1, conditioning=Prompts(CLIPText(str(tmp_path))))


def test_text_fit_and_sample_with_prompts(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=8)
    for i, image in enumerate(sorted(root.rglob("*.png"))):
        image.with_suffix(".txt").write_text(f"{image.parent.name} number {i % 3}")
    runs = tmp_path / "runs"
    result = cli("fit", "--config", "configs/tiny_cpu.yaml", "--data.source", "ImageFolder", "--data.source.root", root,
                 "--data.captions", "true", "--data.batch_size", 4, "--model.conditioning", "Prompts",
                 "--model.conditioning.encoder", "ByteTextEncoder", "--model.conditioning.encoder.width", 32,
                 "--trainer.logger.init_args.save_dir", runs, "--trainer.max_steps", 2,
                 "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.every_n_steps", 2,
                 "--trainer.callbacks.init_args.sampling.steps", 2)
    assert result.returncode == 0, result.stderr
    assert (runs / "tiny_cpu" / "samples.png").is_file()  # a row per caption of the data
    ckpt = runs / "tiny_cpu" / "checkpoints" / "last.ckpt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\na number 1\n\nb number 2\n")
    result = cli("sample", "--ckpt_path", ckpt, "--prompts", prompts, "--num_samples", 3,
                 "--steps", 2, "--guidance_scale", 2, "--out", tmp_path / "grid.npz")
    assert result.returncode == 0, result.stderr
    assert "wrote 9 images" in result.stdout and "(4 network evaluations per image;" in result.stdout

    result = cli("sample", "--ckpt_path", ckpt, "--labels", "1", "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "reads prompts, not labels" in result.stderr
    result = cli("fit", "--config", "configs/tiny_cpu.yaml", "--model.conditioning", "Prompts",
                 "--model.conditioning.encoder", "ByteTextEncoder",
                 "--trainer.logger.init_args.save_dir", tmp_path / "other", "--trainer.max_steps", 1)
    assert result.returncode == 2 and "--data.captions true" in result.stderr


def test_prompts_for_a_model_without_text_are_refused(tmp_path):
    result = cli("sample", "--ckpt_path", "tests/data/eps_ddpm_v1.ckpt", "--prompt", "seven", "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "was not trained on text" in result.stderr and "Traceback" not in result.stderr


def test_a_text_model_folds_guidance_into_meanflow_from_the_empty_prompt():
    torch.manual_seed(0)
    model = text_module(process=Flow(), objective=MeanFlow(guidance_scale=2))
    prompts = ["a seven", "", "two"]  # the second caption was dropped to the empty prompt
    null_y, plain = model.guidance(prompts, ema=False)["null"]
    assert plain.tolist() == [False, True, False]
    assert null_y.shape[0] == 3 and torch.equal(null_y[0], model.conditioning.null(ema=False)[0])
    loss = model.objective.loss(model.net, model.process, torch.rand(3, 1, 8, 8) * 2 - 1,
                                model.conditioning.condition(prompts, ema=False), null=(null_y, plain))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.conditioning.encoder.parameters())

"""A part named wrongly in a config or on the command line (`--model.process X`) ends with one `error:` line that
names the option, what was given and what to do; never jsonargparse's many-line report."""

import pytest

from test_cli import REPO, cli

TINY = REPO / "configs/tiny_cpu.yaml"
PROCESSES = "diffusion_lit.model.process.VP, diffusion_lit.model.process.Flow"


def error_line(result) -> str:
    """The one line a user sees (beside jsonargparse's tip to run --help), after status 2."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("tip:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args,phrases", [
    (["--model.process", "diffusion_lit.model.process.Nope"], ["--model.process diffusion_lit.model.process.Nope", PROCESSES]),
    (["--model.process", "Nope"], ["--model.process Nope: no such class", PROCESSES]),
    (["--model.process", "diffusion_lit.proces.Flow"], ["no module diffusion_lit.proces", PROCESSES]),
    (["--model.process", "diffusion_lit.model.objective.MeanFlow"], ["not a Process", PROCESSES]),
    (["--model.objective", "diffusion_lit.model.objective.Nope"], ["--model.objective", "diffusion_lit.model.objective.MeanFlow"]),
    (["--model.conditioning", "Nope"], ["--model.conditioning", "diffusion_lit.model.conditioning.Labels",
                                        "diffusion_lit.model.conditioning.Prompts"]),
    (["--model.latent", "diffusion_lit.model.latent.Nope"], ["--model.latent", "diffusion_lit.model.latent.Latent"]),
    # a factory of networks: only our networks (a module imported by nothing yet included), not every nn.Module
    (["--model.net", "diffusion_lit.nets.unet.Nope"], ["--model.net", "diffusion_lit.nets.unet.UNet, ", "diffusion_lit.nets.dit.DiT"]),
    (["--data.source", "Nope"], ["--data.source Nope", "diffusion_lit.data.sources.ImageFolder"]),
    (["--trainer.callbacks", "diffusion_lit.training.callbacks.Nope"], ["--trainer.callbacks", "diffusion_lit.training.callbacks.FID"]),
], ids=["class", "short-name", "submodule", "other-kind", "objective", "conditioning", "latent", "net", "source",
        "callbacks"])
def test_a_class_that_does_not_exist_lists_those_that_fit(args, phrases):
    line = error_line(cli("fit", "--config", TINY, *args, "--print_config"))
    for phrase in phrases:
        assert phrase in line
    if "--model.net" in args:
        assert "ResBlock" not in line and "Guide" not in line


def test_a_module_that_does_not_exist_says_how_to_make_one_importable():
    line = error_line(cli("fit", "--config", TINY, "--model.process", "nosuchmodule.Flow", "--print_config"))
    assert line.startswith("error: --model.process nosuchmodule.Flow: Python cannot find the module nosuchmodule")
    assert "PYTHONPATH" in line and PROCESSES in line


def test_ones_own_module_beside_a_config_elsewhere_says_how_to_make_it_importable(tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "beside_config_part.py").write_text(
        "from diffusion_lit.model.process import Flow\n\n\nclass MyProcess(Flow):\n    pass\n")
    (folder / "run.yaml").write_text("model:\n  process:\n    class_path: beside_config_part.MyProcess\n")
    line = error_line(cli("fit", "--config", TINY, "--config", folder / "run.yaml", "--print_config", cwd=tmp_path))
    assert "--model.process beside_config_part.MyProcess" in line
    assert "run from the folder that holds beside_config_part.py" in line and "PYTHONPATH" in line


@pytest.mark.parametrize("where", ["command line", "config"])
def test_a_module_that_raises_on_import_gives_its_one_line(tmp_path, monkeypatch, where):
    (tmp_path / "raising_part.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as when run from its folder
    (tmp_path / "run.yaml").write_text("model:\n  process:\n    class_path: raising_part.MyProcess\n")
    args = ["--model.process", "raising_part.MyProcess"] if where == "command line" else ["--config", "run.yaml"]
    line = error_line(cli("fit", "--config", TINY, *args, "--print_config", cwd=tmp_path))
    assert "--model.process raising_part.MyProcess: importing raising_part failed" in line
    assert "RuntimeError: boom at import" in line and "raising_part.py, line 1" in line


@pytest.mark.parametrize("where", ["command line", "config"])
def test_an_argument_the_class_does_not_take_lists_those_it_takes(tmp_path, where):
    (tmp_path / "run.yaml").write_text(
        "model:\n  process:\n    class_path: diffusion_lit.model.process.Flow\n    init_args: {nope: 3}\n")
    args = (["--model.process", "diffusion_lit.model.process.Flow", "--model.process.init_args.nope", "3"]
            if where == "command line" else ["--config", tmp_path / "run.yaml"])
    line = error_line(cli("fit", "--config", TINY, *args, "--print_config"))
    assert "--model.process diffusion_lit.model.process.Flow: it takes no argument 'nope'; its arguments are shift" in line


def test_an_argument_of_another_part_lists_its_own():
    line = error_line(cli("fit", "--config", TINY, "--model.conditioning", "Labels", "--model.conditioning.nope", "3",
                          "--print_config"))
    assert "--model.conditioning diffusion_lit.model.conditioning.Labels: it takes no argument 'nope'" in line
    assert "its arguments are p_uncond" in line


def test_a_plain_value_of_the_wrong_type_is_one_line_saying_what_was_expected():
    """Not a part: no class list, but jsonargparse's own words on one line."""
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.batch_size", "abc")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "data.batch_size" in errors[0] and "Expected a <class 'int'>" in errors[0] and "class" not in errors[0][:40]
    assert "no such class" not in errors[0]


def test_an_old_class_path_stops_with_the_new_one_on_the_command_line_and_in_a_config(tmp_path):
    """The modules moved into subpackages: every old class path, on the command line or anywhere in a config (nested
    ones too, as an old run's config.yaml holds them), is named in one line with its new one."""
    config = tmp_path / "old.yaml"
    config.write_text((REPO / "configs/digits_text_cpu.yaml").read_text()
                      .replace("diffusion_lit.data.sources.ShippedDigits", "diffusion_lit.sources.ShippedDigits")
                      .replace("diffusion_lit.nets.text.ByteTextEncoder", "diffusion_lit.text.ByteTextEncoder"))
    result = cli("fit", "--config", config, "--model.process", "diffusion_lit.process.Flow")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: class paths from before diffusion_lit's subpackages in {config} and the "
                                "command line: ")
    for old, new in (("diffusion_lit.sources.ShippedDigits", "diffusion_lit.data.sources.ShippedDigits"),
                     ("diffusion_lit.text.ByteTextEncoder", "diffusion_lit.nets.text.ByteTextEncoder"),
                     ("diffusion_lit.process.Flow", "diffusion_lit.model.process.Flow")):
        assert f"{old} -> {new}" in errors[0]
    model = tmp_path / "ae.yaml"
    model.write_text("model:\n  class_path: diffusion_lit.autoencoder.AutoencoderModule\n")
    result = cli("fit", "--config", model)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "diffusion_lit.autoencoder.AutoencoderModule -> diffusion_lit.model.autoencoder.AutoencoderModule: write the "
        "new ones"), result.stderr
    from diffusion_lit.core.moved import moved

    assert moved("diffusion_lit.data.ShippedDigits") is None  # `data` was a module and is a package: nothing moved

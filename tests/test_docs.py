"""The README and the pages in docs/ stay true to the repository: their relative links lead to files that exist, and
every `python -m diffusion_lit ...` command in their bash blocks parses (with `--help` or `--print_config`)."""

import re
import shlex
from pathlib import Path

import pytest

from diffusion_lit.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
# [text](target) and ![alt](target), with an optional "title" after the target
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PREFIX = ["python", "-m", "diffusion_lit"]
# Plain functions behind jsonargparse (`data optimize` among `data`'s): --help prints their options
HELP_COMMANDS = {"sample", "evaluate", "export", "ema", "data"}


def relative_links(page: Path) -> list[str]:
    """The targets of the page's links outside code blocks, less web links and pure #anchors."""
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"(https?:|mailto:|#)", t)]


def commands(page: Path) -> list[list[str]]:
    """The `python -m diffusion_lit` commands of the page's bash blocks, as the words after the prefix: lines ending
    with a backslash are joined to the next, and trailing # comments dropped."""
    found = []
    for block in BASH_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == PREFIX:
                found.append(words[3:])
    return found


LINKS = [(page, target) for page in PAGES for target in relative_links(page)]
# Each command once, on the first page that shows it: a command repeated on another page parses the same.
FIRST_SHOWN: dict[tuple, tuple] = {}
for _page in PAGES:
    for _words in commands(_page):
        FIRST_SHOWN.setdefault(tuple(_words), (_page, _words))
COMMANDS = list(FIRST_SHOWN.values())


def test_the_pages_are_found():
    assert README.is_file() and len(PAGES) > 1
    assert len(commands(README)) >= 10, "the README's commands were not found: has the bash block syntax changed?"
    assert LINKS


@pytest.mark.parametrize(
    "page, target", LINKS, ids=[f"{page.relative_to(ROOT)}:{target}" for page, target in LINKS]
)
def test_relative_link_resolves(page, target):
    path = target.split("#", 1)[0]
    assert (page.parent / path).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def without_ckpt_path(words: list[str]) -> list[str]:
    """The words less any `--ckpt_path X` pair (or `--ckpt_path=X`). The commands resume from checkpoints under
    runs/ that only exist after a training run; a fit command's --ckpt_path is read as a file when the CLI is
    built, so leaving it in would test whether a checkpoint exists, not whether the command parses."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--ckpt_path":
            skip = True
        elif not word.startswith("--ckpt_path="):
            kept.append(word)
    return kept


def run_cli(args: list[str]) -> int:
    """Runs the command line in-process; the exit status (0 when it returned without exiting)."""
    try:
        main(args)
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code
    return 0


@pytest.mark.parametrize(
    "page, words", COMMANDS, ids=[f"{page.relative_to(ROOT)}:{' '.join(words)[:90]}" for page, words in COMMANDS]
)
def test_command_parses(page, words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/... relative to the repository root
    command = " ".join(PREFIX + words)
    if words[0] in HELP_COMMANDS:
        status = run_cli(words + ["--help"])
        out, err = capsys.readouterr()
        assert status == 0, f"{command} --help exited with {status}: {err.strip()[-500:]}"
        # --help returns before unknown options are reported, so check the command's option names against it (a
        # part's own options, --source.root, are in its class's help: the part's name is checked)
        for option in {w.split("=", 1)[0].split(".")[0] for w in words if w.startswith("--")}:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), f"{command}: {words[0]} has no {option}"
        return
    assert words[0] == "fit" or words[:2] == ["autoencoder", "fit"], f"{command}: no parse check for this command"
    # `fit --config configs/digits_autoencoder.yaml` parses because that config names its LightningModule
    # (model.class_path: diffusion_lit.model.autoencoder.AutoencoderModule); a CLI that ignores model.class_path fails it
    # with "Group 'model' does not accept option 'block_out_channels'". The README documents that command.
    status = run_cli(without_ckpt_path(words) + ["--print_config"])
    out, err = capsys.readouterr()
    assert status == 0, f"{command} --print_config exited with {status}: {err.strip()[-500:]}"
    assert out.strip(), f"{command} --print_config printed nothing"

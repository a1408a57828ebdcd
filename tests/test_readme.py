"""Every code block of the README runs: the Python blocks as written (in a scratch folder), every
`vit-2ssp` command's flags parse into a run config, and the commands on the embedded model run
(their outputs redirected, timed quickly; the README's first command also runs verbatim in CI)."""
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import cli_run
from vit_pruning.cli import build_parser, config_from_args

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def commands() -> list[list[str]]:
    """Every `vit-2ssp` command line of the README's bash blocks, as its flags."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                at = [i for i, w in enumerate(words) if w.endswith("vit-2ssp")]
                if at:
                    out.append(words[at[0] + 1:])
    return out


def test_the_readme_has_code_to_check():
    assert blocks("python") and len(commands()) >= 5


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[0][:40])
def test_every_readme_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.cli
@pytest.mark.parametrize("argv", [a for a in commands() if a[:2] == ["--model", "embedded"]],
                         ids=lambda a: " ".join(a)[:60])
def test_the_readme_commands_on_the_embedded_model_run(argv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert cli_run(tmp_path, *argv) == 0
    assert list((tmp_path / "reports").glob("report-*.json"))

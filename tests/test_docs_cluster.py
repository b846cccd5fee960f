"""docs/cluster.md's commands are the ones the tests run: every torchrun line launches with a shape of
`tests/launch.py` (which the distributed tests launch with), runs a `mechscope` command those tests run, and
gives only options that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import launch
import pytest
import typer

from mechscope import cli

PAGE = Path(__file__).parent.parent / "docs" / "cluster.md"
TESTED = {("index", "build"), ("harvest",), ("train-dict",)}
"""The commands tests/test_index_distributed.py and tests/test_distributed_jobs.py run under torchrun."""


def _lines() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith("torchrun ")]


def _matches(shape: tuple[str, ...], args: list[str]) -> bool:
    """`args` is `shape` with each {PLACEHOLDER} filled by one word."""
    return len(args) == len(shape) and all(want.startswith("{") or want == got for want, got in zip(shape, args, strict=True))


def _command(words: list[str]) -> tuple[tuple[str, ...], object, list[str]]:
    group = typer.main.get_command(cli.app)
    path, command = [], group
    while hasattr(command, "commands"):  # a group: the next word names its command
        path.append(words[len(path)])
        command = command.commands[path[-1]]
    return tuple(path), command, words[len(path) :]


def test_the_page_has_both_launches_of_each_job():
    lines = _lines()
    jobs = {_command(line[line.index("mechscope") + 1 :])[0] for line in lines}
    assert jobs == TESTED and len(lines) == 2 * len(TESTED)


@pytest.mark.parametrize("line", _lines(), ids=lambda line: " ".join(line[:3]))
def test_each_line_is_a_tested_launch_of_a_tested_command(line):
    end = line.index("--no-python")
    assert _matches(launch.ONE_NODE, line[1:end]) or _matches(launch.NODES, line[1:end]), line[1:end]
    assert line[end + 1] == "mechscope"
    path, command, rest = _command(line[end + 2 :])
    assert path in TESTED
    options = {opt for param in command.params for opt in param.opts}
    given = [word for word in rest if word.startswith("--")]
    assert given and set(given) <= options, set(given) - options

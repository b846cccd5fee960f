"""What every `mechscope` command shares: literal text, bounds on numbers, output paths, one-line errors.

- Text from the user, a model or a corpus is shown as it is: `shown` escapes it for rich markup
  strings, `literal` makes it a `Text` (never read as markup); both show control characters
  (terminal escape sequences, bells, carriage returns) as `\\x1b`-style escapes instead of sending
  them to the terminal.
- Numbers are checked before any work with `check_range` / `check_positions`, and output paths
  with `check_output` / `check_folder`; each raises a one-line `MechscopeError` naming the option,
  the value and what is valid.
- `atomic_output` writes a file through a temporary file beside it, renamed into place on success
  and removed on failure, so a failed write leaves nothing behind.
- `usage_line` turns an option-parsing error (click's) into one line naming the option and value.
- `DeviceOpt` is the `--device` of the long jobs (index build, harvest, train-dict), `job_device` its check.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.text import Text

from mechscope.errors import MechscopeError
from mechscope.viz.shown import plain

if TYPE_CHECKING:
    import torch


def visible(text: object, newlines: bool = False) -> str:
    """`text` with every character that is invisible or acts on the terminal shown as an escape (`\\x1b`,
    `\\x07`, `\\u202e`), as every view shows it (`mechscope.viz.shown`); newlines are kept unless
    `newlines=True`, which shows them as `\\n` (for one-line messages)."""
    text = plain(str(text)).plain
    return text.replace("\n", "\\n") if newlines else text


def shown(text: object) -> str:
    """`text` as it is, for a rich markup string: control characters visible, brackets escaped."""
    return escape(visible(text))


def literal(text: object, style: str = "") -> Text:
    """`text` as a rich `Text` that is never read as markup, control characters visible."""
    return Text(visible(text), style=style)


def error_line(message: object) -> str:
    """A message as one line: its lines joined, control characters visible."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return visible(" ".join(lines), newlines=True)


# -- numbers --------------------------------------------------------------------------------------


def check_range(option: str, value: int, low: int, high: int, why: str = "") -> int:
    """`value` if low <= value <= high, else a one-line error naming `option`; `why` explains the bound."""
    if not low <= value <= high:
        raise MechscopeError(f"{option} {value} is out of range: valid values are {low}..{high}{why}")
    return value


def check_positions(option: str, positions: Sequence[int], n_tokens: int) -> list[int]:
    """Positions of a text of `n_tokens` tokens (negative ones count from the end), each checked."""
    for p in positions:
        if not -n_tokens <= p < n_tokens:
            raise MechscopeError(
                f"position {p} out of range ({option}): the text has {n_tokens} tokens, so valid positions are "
                f"0..{n_tokens - 1}, or -{n_tokens}..-1 counting from the end"
            )
    return list(positions)


# -- output paths ---------------------------------------------------------------------------------


def _writable_folder(option: str, path: Path, folder: Path) -> None:
    """The nearest existing folder at or above `folder` is a folder we can create files in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MechscopeError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mechscope-probe-")
    except OSError as error:
        # ENOENT in a folder that exists: a virtual file system (/proc, /sys) that takes no new files
        reason = "it takes no new files" if error.errno == errno.ENOENT else error.strerror or type(error).__name__
        raise MechscopeError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is not writable ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def check_html_png(html: Path | str | None, png: Path | str | None) -> tuple[Path | None, Path | None]:
    """`check_output` for a command's --html and --png, which must name two different files."""
    html, png = check_output("--html", html), check_output("--png", png, ".png")
    if html and png and html.resolve() == png.resolve():
        raise MechscopeError(
            f"--html and --png are the same file {str(png)!r}: "
            f"give the HTML its own path, such as {str(png.with_suffix('.html'))!r}"
        )
    return html, png


def check_output(option: str, path: Path | str | None, suffix: str | None = None) -> Path | None:
    """Check, before any work, that the file `path` can be written (None passes through).

    It must not be a folder or a special file, it must end in `suffix` when one is given, and the
    nearest existing folder above it must accept new files (missing folders are created on writing).
    """
    if path is None:
        return None
    path = Path(path)
    given = str(path)
    if path.is_dir():
        example = path / f"out{suffix or ''}"
        raise MechscopeError(f"{option} {given!r} is a folder: give a file path, such as {str(example)!r}")
    if suffix is not None and path.suffix.lower() != suffix:
        example = f"{path.stem or 'out'}{suffix}"
        raise MechscopeError(f"{option} {given!r} does not end in {suffix}: give a file name such as {example!r}")
    if path.exists() and not path.is_file():
        raise MechscopeError(f"{option} {given!r} is not a regular file: give a file path")
    _writable_folder(option, path, path.parent)
    return path


def check_folder(option: str, path: Path | str) -> Path:
    """Check, before any work, that files can be written in the folder `path` (created if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MechscopeError(f"{option} {str(path)!r} is a file: give a folder")
    _writable_folder(option, path, path)
    return path


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write; rename it to `path` on success, remove it on failure.

    >>> with atomic_output("lens.png") as tmp:
    ...     figure.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# -- where a long job computes --------------------------------------------------------------------

DeviceOpt = Annotated[
    str,
    typer.Option(
        help="Where the model (and training) runs: auto (cuda:LOCAL_RANK where CUDA is available, so under torchrun "
        "each process on its own GPU; else cpu), cpu, cuda (this process's GPU) or cuda:N."
    ),
]


def job_device(choice: str) -> torch.device:
    """The `torch.device` of --device `choice` (`runtime.process_device`), checked before the model loads."""
    from mechscope.runtime import process_device

    return process_device(choice, "--device")


# -- option-parsing errors ------------------------------------------------------------------------


def _given_values(argv: Sequence[str], opts: Sequence[str]) -> list[str]:
    """Every value given on the command line for an option with any of the names `opts`."""
    values = []
    for i, arg in enumerate(argv):
        for opt in opts:
            if arg == opt and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif opt.startswith("--") and arg.startswith(opt + "="):
                values.append(arg[len(opt) + 1 :])
            elif len(opt) == 2 and not arg.startswith("--") and arg.startswith(opt) and len(arg) > 2:
                values.append(arg[2:])
    return values


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _lower(message: object) -> str:
    """A message as part of a line: first letter lower case, no final full stop."""
    text = str(message).strip().rstrip(".")
    return text[:1].lower() + text[1:]


def _command(error) -> str:
    ctx = getattr(error, "ctx", None)
    return ctx.command_path if ctx is not None else "mechscope"


def usage_line(error, argv: Sequence[str]) -> str:
    """One line for an option-parsing error (click's `UsageError` and kin) that names the option and the value."""
    kind = type(error).__name__
    command = _command(error)
    hint = f"'{command} --help' lists the options"
    param = getattr(error, "param", None)
    if kind == "MissingParameter":
        help_text = str(getattr(param, "help", None) or "").rstrip(".")
        return f"{_lower(error.format_message())} for '{command}'" + (f": {_lower(help_text)}" if help_text else "")
    if kind == "BadOptionUsage" and "requires an argument" in str(error.message):
        return f"option {error.option_name} needs a value"
    if kind == "BadParameter" and param is not None:
        opts = list(getattr(param, "opts", []) or [])
        name = " / ".join(opts) if getattr(param, "param_type_name", "") == "option" else param.human_readable_name
        values = _given_values(argv, opts) if opts else []
        bad = next((v for v in values if not _is_int(v)), values[-1] if values else None)
        shown_value = "" if bad is None else f" {bad!r}"
        return f"{name}{shown_value} is not valid: {_lower(error.message)} ({hint})"
    if kind == "NoSuchOption":
        token = next((a for a in argv if a.startswith(error.option_name)), error.option_name)
        line = f"no such option {token!r} for '{command}'"
        if re.fullmatch(r"-\d.*", token):
            return f"{line}: an argument that starts with '-' is read as an option; put '--' before the arguments to pass it"
        possible = sorted(getattr(error, "possibilities", None) or [])
        return line + (f": did you mean {' or '.join(possible)}?" if possible else f" ({hint})")
    ctx = getattr(error, "ctx", None)
    line = _lower(error.format_message())
    if ctx is not None and hasattr(ctx.command, "list_commands") and "command" in line.lower():
        return f"{line}: valid commands are {', '.join(ctx.command.list_commands(ctx))}"
    return f"{line} ({hint})"

"""The one error type mechscope raises for bad input, and the command line's exit codes.

Every message names the bad value and what would have been valid, on one line, so the CLI can
print it as it is and a notebook user can act on it without reading a traceback.

Exit codes of the `mechscope` command:

- 0: done.
- 2: bad input. A `MechscopeError`, or an option that does not parse (not a number, missing, unknown),
  or an output path that cannot be written: one line on stderr naming the option or value and what
  is valid, printed before any work starts where the check does not need the model's output.
- 1: an internal failure (a bug, or a failure of the machine such as a full disk): one line on
  stderr; `MECHSCOPE_DEBUG=1` shows the traceback instead.
"""


class MechscopeError(ValueError):
    """Bad input: an unknown model, site, layer, position, target or option."""


def one_of(values, limit: int = 12) -> str:
    """Render a short list of valid choices for an error message."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")

"""The one error type mechscope raises for bad input.

Every message names the bad value and what would have been valid, on one line, so the CLI can
print it as it is and a notebook user can act on it without reading a traceback.
"""


class MechscopeError(ValueError):
    """Bad input: an unknown model, site, layer, position, target or option."""


def one_of(values, limit: int = 12) -> str:
    """Render a short list of valid choices for an error message."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")

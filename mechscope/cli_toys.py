"""Commands: toy superposition, toy phase-diagram, toy dimensionality.

`register(app)` adds them to the `mechscope` command; they follow its conventions (`cli_common`).
"""

from __future__ import annotations


def register(app) -> None:
    """Add this module's commands to `app`."""

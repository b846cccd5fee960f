"""The peers' own venv: created on first use, torch pinned first, then the peers of requirements.txt.

A peer that cannot be installed is not fatal: `ensure` returns why (pip's last lines), the run measures
the others, and the results say which peer is missing and why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
REQUIREMENTS = HERE / "requirements.txt"
TORCH = "torch==2.13.0"  # the CPU wheel on local disk; an unpinned torch pulls a CUDA build of several GB


def requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def _pip(python: str, *args: str) -> tuple[bool, str]:
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return proc.returncode == 0, " | ".join(lines[-3:])


def ensure(log) -> tuple[str, dict[str, str]]:
    """The peers' python, and {requirement: why it could not be installed} for those that failed."""
    python = str(VENV / "bin" / "python")
    if not Path(python).exists():
        log(f"creating the peers' venv in {VENV.relative_to(HERE.parents[1])}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    ok, why = _pip(python, TORCH)
    if not ok:
        return python, {TORCH: why}
    log("installing the peers (pip; a no-op once they are there)")
    ok, _ = _pip(python, *requirements())
    if ok:
        return python, {}
    failed = {}  # together they failed: find out which, and keep the ones that install alone
    for req in requirements():
        ok, why = _pip(python, req)
        if not ok:
            failed[req] = why
    return python, failed

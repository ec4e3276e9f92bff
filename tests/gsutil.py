"""Helpers the tests share: run gradscope (or plain python) on a script in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def gradscope(*args: str, cwd: Path | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw,
    )


def python(*args: str, cwd: Path | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
    )


def script(name: str) -> str:
    return str(SCRIPTS / name)


def env_without_gradscope() -> dict:
    env = dict(os.environ)
    env.pop("GRADSCOPE_RUN_DIR", None)
    return env

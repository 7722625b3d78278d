"""A Python script run in a new interpreter, for the tests that need one (a fresh Numba cache, another
threading layer, environment variables read at import)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(script: str, *args: str, env: dict[str, str | None] | None = None, timeout: float = 600) -> str:
    """The standard output of ``python -c script *args`` in a new process whose environment is this one's
    updated with `env` (a None value removes the variable); the test fails, with the end of the standard
    error, unless the process exits with status 0."""
    environment = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    done = subprocess.run([sys.executable, "-c", script, *args], env=environment, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

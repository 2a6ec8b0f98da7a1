"""Cold start-ups measure an installed package: its modules byte-compiled, as pip leaves them.

A checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (or from a read-only tree) has no ``.pyc`` for a module
changed since the last compile, so every fresh interpreter would compile it again: about 7 ms for
``executor.py`` alone, charged to the executor's start-up but not to ProcessPoolExecutor's (the standard
library is always compiled).
"""

from __future__ import annotations

import compileall
import importlib.util
from pathlib import Path


def compile_packages(*names: str) -> None:
    """Write the missing or stale ``.pyc`` files of these packages (``py_compile`` writes them whatever
    ``PYTHONDONTWRITEBYTECODE`` says)."""
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                compileall.compile_dir(Path(location), quiet=1)

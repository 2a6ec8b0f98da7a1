"""What the command line's modules share about its mistakes: the exit codes and the error a mistake raises."""

from __future__ import annotations

USAGE, RUNTIME = 2, 1  # exit codes: a mistake in the command line; a failure while doing what it asked


class UsageError(ValueError):
    """A mistake in the command line that argparse cannot see (a URL's scheme, an option for another scheme)."""

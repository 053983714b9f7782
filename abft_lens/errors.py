"""The one exception type users see: it names the problem and how to fix it."""

from __future__ import annotations


class AbftLensError(ValueError):
    """Bad input or an unusable resource. ``str(error)`` is one message: what went wrong, then the fix.

    The CLI prints it without a traceback and exits with status 2. It is a ``ValueError``, so Python callers
    that catch bad values the usual way (``except ValueError``) catch it too.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

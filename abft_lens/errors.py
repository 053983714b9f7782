"""The one exception type users see: it names the problem and how to fix it."""

from __future__ import annotations


class AbftLensError(ValueError):
    """Bad input or an unusable resource. ``str(error)`` is one message: what went wrong, then the fix.

    The CLI prints it without a traceback and exits with status 2. It is a ``ValueError``, so Python callers
    that catch bad values the usual way (``except ValueError``) catch it too.

    ``names``: the options the message names, spelled as Python names (``train_samples``, ``n_test=9``); the
    command line rewrites exactly these into its flags (``--train-samples``, ``--n-test 9``), so the library's
    messages name what a Python caller passes and the CLI's what a shell user types.
    """

    def __init__(self, problem: str, fix: str | None = None, *, names: tuple[str, ...] = ()):
        self.problem = problem
        self.fix = fix
        self.names = tuple(names)
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

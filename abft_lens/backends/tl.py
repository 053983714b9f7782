"""The one place that imports TransformerLens.

TransformerLens 3.9 is the last release with ``HookedTransformer``; it emits a DeprecationWarning on import
and on construction pointing at 4.x, which removed the class this project is built on. That warning is
silenced where it is raised (the import below, and :func:`quiet_deprecation` around each construction);
nothing here changes process-wide state: no environment variables, no global warning or logging filters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Silence TransformerLens's own DeprecationWarnings (and only those) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformer_lens(\..*)?")
        warnings.filterwarnings("ignore", message=r".*HookedTransformer.*deprecated.*", category=DeprecationWarning)
        yield


with quiet_deprecation():
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
    from transformer_lens.hook_points import HookPoint  # noqa: E402

__all__ = ["HookedTransformer", "HookedTransformerConfig", "HookPoint", "quiet_deprecation"]

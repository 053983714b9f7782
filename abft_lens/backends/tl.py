"""The one place that imports TransformerLens.

TransformerLens 3.9 is the last release with ``HookedTransformer``; it emits a DeprecationWarning on import
and on construction pointing at 4.x, which removed the class this project is built on. That warning is
silenced where it is raised (the import below, and :func:`quiet_deprecation` around each construction).

TransformerLens imports bitsandbytes when it is installed. On CPUs with AVX512-BF16, bitsandbytes then logs,
once, from its CPU backend (logger ``bitsandbytes.backends.cpu.ops``), that it could not load the optional
``kernels`` package; it carries on with its own CPU kernel. :func:`quiet_bitsandbytes` drops that one record
on that one logger, during the import below only, so that every command's stderr is the same on every CPU.

Nothing here changes process-wide state: no environment variables, no global warning or logging filters
(the logger filter is removed again when the import is done).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


@contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Silence TransformerLens's own DeprecationWarnings (and only those) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformer_lens(\..*)?")
        warnings.filterwarnings("ignore", message=r".*HookedTransformer.*deprecated.*", category=DeprecationWarning)
        yield


class DropKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" record; passes the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BNB_KERNELS_NOTICE)


@contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Inside the block, :class:`DropKernelsNotice` filters bitsandbytes' CPU-backend logger; removed afterwards.

    A no-op when bitsandbytes is already imported (it logs the notice on import, once) or not installed, so
    no logger is created for a package that is absent.
    """
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    logger, notice = logging.getLogger(BNB_CPU_LOGGER), DropKernelsNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


with quiet_deprecation(), quiet_bitsandbytes():
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
    from transformer_lens.hook_points import HookPoint  # noqa: E402

__all__ = ["HookedTransformer", "HookedTransformerConfig", "HookPoint", "quiet_deprecation", "quiet_bitsandbytes"]

"""The one place that imports TransformerLens, and the one place that knows which version is installed.

abft-lens runs on TransformerLens 3.9 (``HookedTransformer``, the default set-up) and on 4.x (4.0 deleted
``HookedTransformer``; every model is a ``TransformerBridge``). The version is read once, here, at import
(:data:`TL_VERSION`, :data:`HAS_HOOKED`); nothing above ``backends/`` asks it: the layers above see a model
and ask what kind it is (``is_bridge``), which a 4-bit base on 3.9 also answers with a bridge. Under 4.x,
:data:`HookedTransformer` and :data:`HookedTransformerConfig` are stand-ins that no object is an instance of
and that refuse to be built, with a message naming the installed version and the fix.

TransformerLens 3.9 is the last release with ``HookedTransformer``; it emits a DeprecationWarning on import
and on construction pointing at 4.x, which removed the class this project is built on. That warning is
silenced where it is raised (the import below, and :func:`quiet_deprecation` around each construction).

TransformerLens 3.9 imports bitsandbytes when it is installed (under 4.x it is imported here, for the same reason). On CPUs with AVX512-BF16, bitsandbytes then logs,
once, from its CPU backend (logger ``bitsandbytes.backends.cpu.ops``), that it could not load the optional
``kernels`` package; it carries on with its own CPU kernel. :func:`quiet_bitsandbytes` drops that one record
on that one logger, during the import below only, so that every command's stderr is the same on every CPU.

Nothing here changes process-wide state: no environment variables, no global warning or logging filters
(the logger filter is removed again when the import is done).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from abft_lens.errors import AbftLensError

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


TL_VERSION: str = importlib.metadata.version("transformer-lens")
"""The installed TransformerLens version, e.g. ``"3.9.0"`` or ``"4.3.0"``."""
HAS_HOOKED: bool = int(TL_VERSION.split(".")[0]) < 4
"""True under TransformerLens 3.x (``HookedTransformer`` exists); False under 4.x (every model is a bridge)."""


def hooked_only(what: str) -> AbftLensError:
    """The error for a 3.9-only call (``what``) under TransformerLens 4.x: it names the version and the fix."""
    return AbftLensError(f"{what} needs TransformerLens 3.9's HookedTransformer, and TransformerLens {TL_VERSION} "
                         "is installed (4.0 removed HookedTransformer).",
                         "use a TransformerBridge (abft_lens.load_model(...) returns one under 4.x, or "
                         "TransformerBridge.boot_transformers(...)), or set up TransformerLens 3.9 "
                         "(scripts/setup.sh builds .venv with it).")


class _Absent:
    """Stand-in for a class TransformerLens 4.x removed: no object is an instance; building one raises."""

    def __new__(cls, *args, **kwargs):
        raise hooked_only(cls.__name__)


with quiet_deprecation(), quiet_bitsandbytes():
    if HAS_HOOKED:
        from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
    else:
        HookedTransformer = type("HookedTransformer", (_Absent,), {"__doc__": "Removed in TransformerLens 4.0."})
        HookedTransformerConfig = type("HookedTransformerConfig", (_Absent,), {"__doc__": "Removed in 4.0."})
    from transformer_lens.hook_points import HookPoint  # noqa: E402
    if not HAS_HOOKED and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401  (3.9 imports it inside TransformerLens; 4.x later, through PEFT)


def bridge_class() -> type:
    """``TransformerBridge`` (imported on first use: under 3.9 most runs never need it)."""
    with quiet_deprecation(), quiet_bitsandbytes():
        from transformer_lens.model_bridge import TransformerBridge
    return TransformerBridge


def official_names():
    """The module holding TransformerLens's official names: ``OFFICIAL_MODEL_NAMES`` and
    ``get_official_model_name`` (3.9: ``loading_from_pretrained``; 4.x: ``supported_models``)."""
    with quiet_deprecation():
        if HAS_HOOKED:
            from transformer_lens import loading_from_pretrained as names
        else:
            from transformer_lens import supported_models as names
    return names


__all__ = ["HookedTransformer", "HookedTransformerConfig", "HookPoint", "TL_VERSION", "HAS_HOOKED", "hooked_only",
           "bridge_class", "official_names", "quiet_deprecation", "quiet_bitsandbytes"]

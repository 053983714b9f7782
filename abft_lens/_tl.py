"""The one place that imports TransformerLens.

TransformerLens 3.9 is the last release with ``HookedTransformer``; it emits a DeprecationWarning on import
and on construction pointing at 4.x, which removed the class this project is built on. That one warning is
filtered here (and only that one); every other warning still reaches the user.
"""

from __future__ import annotations

import logging
import os
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")  # wandb is a hard dependency of transformer-lens

# bitsandbytes (imported by transformers) logs that the optional `kernels` package is missing; that package
# downloads from the hub and is never wanted here, so this one message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformer_lens(\..*)?")
warnings.filterwarnings("ignore", message=r".*HookedTransformer.*deprecated.*", category=DeprecationWarning)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
    from transformer_lens.hook_points import HookPoint  # noqa: E402

__all__ = ["HookedTransformer", "HookedTransformerConfig", "HookPoint"]

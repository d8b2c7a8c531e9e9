"""bitsandbytes, imported without letting it reach the internet.

On a CPU with AVX512-BF16, importing bitsandbytes (directly, or through peft, which imports it when
it is installed) asks the `kernels` package for a compiled kernel from the Hugging Face Hub: an
HTTP request to the Hub at import time (the publisher's trust status, and huggingface_hub's
agent registry with it) and, where the publisher is trusted, a download of native code that is
then loaded into the process. A household assistant that promises to stay offline unless asked
must do neither, and must not run code it did not ship. So bitsandbytes is imported once, here,
with `kernels` made unimportable for that moment; bitsandbytes then uses its own CPU kernels (the
ones every figure in docs/ was measured with: this machine has no internet, so the Hub kernel
never loaded here either) and says so in a warning, which is silenced because nothing is wrong.

Every place where Hearth may import bitsandbytes or peft first (a quantised backbone, a new
LoRA model, an adapter loaded for chat) calls `import_bitsandbytes()` before; once imported,
Python reuses the module, so later plain imports (peft's state-dict helpers, on a model that
exists already) are safe.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType


def import_bitsandbytes() -> ModuleType:
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    had_kernels = "kernels" in sys.modules
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` raises ImportError
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)   # "Failed to load CPU gemm_4bit_forward from kernels-community"
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
        if had_kernels:
            sys.modules["kernels"] = saved  # type: ignore[assignment]
        else:
            del sys.modules["kernels"]
    return bitsandbytes

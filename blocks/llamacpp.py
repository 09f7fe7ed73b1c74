"""The `llama.cpp Server` block, defined in `prefect_llamacpp.blocks`; this file is what
`prefect block register -f blocks/llamacpp.py` reads."""

import sys

from prefect_llamacpp import blocks as _module
from prefect_llamacpp.blocks import DEFAULT_BLOCK_NAME, LlamaCppServer

__all__ = ["DEFAULT_BLOCK_NAME", "LlamaCppServer"]

# Imported by name, this path is the package's module itself (every name; a patch here is a patch
# there); loaded from its file (a prefect.yaml entry point, `register -f`) it holds the names above.
if __name__ == "blocks.llamacpp":
    sys.modules[__name__] = _module

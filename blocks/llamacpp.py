"""The `llama.cpp Server` block, defined in `prefect_llamacpp.blocks`; this file is what
`prefect block register -f blocks/llamacpp.py` reads."""

from prefect_llamacpp.blocks import DEFAULT_BLOCK_NAME, LlamaCppServer

__all__ = ["DEFAULT_BLOCK_NAME", "LlamaCppServer"]

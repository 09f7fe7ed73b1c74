"""The blocks this Prefect project uses: `prefect_llamacpp`'s, re-exported so
`prefect block register -m blocks` (or `-f blocks/llamacpp.py`) finds them."""

from prefect_llamacpp.blocks import LlamaCppServer

__all__ = ["LlamaCppServer"]

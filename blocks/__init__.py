"""Prefect blocks of prefect-llamacpp (re-exported so `prefect block register -m blocks` finds them)."""

from blocks.llamacpp import LlamaCppServer

__all__ = ["LlamaCppServer"]

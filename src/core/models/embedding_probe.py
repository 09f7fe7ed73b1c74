"""The seed's path to `prefect_llamacpp.embedding_probe`: the packed-embeddings check. The same module object, not a copy."""

import sys

import prefect_llamacpp.embedding_probe as _module

sys.modules[__name__] = _module

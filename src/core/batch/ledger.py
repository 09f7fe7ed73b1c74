"""The seed's path to `prefect_llamacpp.batch.ledger`: batch machinery. The same module object, not a copy."""

import sys

import prefect_llamacpp.batch.ledger as _module

sys.modules[__name__] = _module

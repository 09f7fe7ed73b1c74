"""The seed's path to `prefect_llamacpp.fast_json`: the ledger's JSON. The same module object, not a copy."""

import sys

import prefect_llamacpp.fast_json as _module

sys.modules[__name__] = _module

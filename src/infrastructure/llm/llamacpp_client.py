"""The seed's path to `prefect_llamacpp.client`: `LlamaCppClient`. The same module object, not a copy."""

import sys

import prefect_llamacpp.client as _module

sys.modules[__name__] = _module

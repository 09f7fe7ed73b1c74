"""The seed's path to `prefect_llamacpp.config`: `LlamaCppSettings`. The same module object, not a copy."""

import sys

import prefect_llamacpp.config as _module

sys.modules[__name__] = _module

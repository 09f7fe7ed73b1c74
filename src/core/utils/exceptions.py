"""The seed's path to `prefect_llamacpp.exceptions`: the error tree. The same module object, not a copy."""

import sys

import prefect_llamacpp.exceptions as _module

sys.modules[__name__] = _module

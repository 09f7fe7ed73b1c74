"""The seed's path to `prefect_llamacpp.canary`: the health canary. The same module object, not a copy."""

import sys

import prefect_llamacpp.canary as _module

sys.modules[__name__] = _module

"""The seed's path to `prefect_llamacpp.log`: the library's logger. The same module object, not a copy."""

import sys

import prefect_llamacpp.log as _module

sys.modules[__name__] = _module

"""The seed's path to `prefect_llamacpp.request`: request bodies and answers. The same module object, not a copy."""

import sys

import prefect_llamacpp.request as _module

sys.modules[__name__] = _module

"""The seed's path to `prefect_llamacpp.status`: `ProviderHealthStatus` and `ServerState`. The same module object, not a copy."""

import sys

import prefect_llamacpp.status as _module

sys.modules[__name__] = _module

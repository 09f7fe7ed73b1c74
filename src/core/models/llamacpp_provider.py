"""The seed's path to `prefect_llamacpp.provider`: the pydantic-ai provider, health checks, model detection. The same module object, not a copy."""

import sys

import prefect_llamacpp.provider as _module

sys.modules[__name__] = _module

"""The seed's path to `prefect_llamacpp.server_url`: server URL parsing. The same module object, not a copy."""

import sys

import prefect_llamacpp.server_url as _module

sys.modules[__name__] = _module

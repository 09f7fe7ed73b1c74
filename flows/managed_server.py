"""The managed-server flow, defined in `prefect_llamacpp.flows.managed_server`: `prefect.yaml`'s
entry point."""

import sys

from prefect_llamacpp.flows import managed_server as _module
from prefect_llamacpp.flows.managed_server import llamacpp_managed_server_flow

__all__ = ["llamacpp_managed_server_flow"]

# Imported by name, this path is the package's module itself (every name; a patch here is a patch
# there); loaded from its file (a prefect.yaml entry point, `register -f`) it holds the names above.
if __name__ == "flows.managed_server":
    sys.modules[__name__] = _module

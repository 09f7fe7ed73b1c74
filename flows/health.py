"""The health flow, defined in `prefect_llamacpp.flows.health`: `prefect.yaml`'s entry point and
`python -m flows.health [BLOCK ...]`."""

import sys

from prefect_llamacpp.flows import health as _module
from prefect_llamacpp.flows.health import llamacpp_health_flow, main

__all__ = ["llamacpp_health_flow", "main"]

# Imported by name, this path is the package's module itself (every name; a patch here is a patch
# there); loaded from its file (a prefect.yaml entry point, `register -f`) it holds the names above.
if __name__ == "flows.health":
    sys.modules[__name__] = _module
elif __name__ == "__main__":
    sys.exit(main())

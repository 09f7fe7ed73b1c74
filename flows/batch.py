"""The batch flow, defined in `prefect_llamacpp.flows.batch`: `prefect.yaml`'s entry point and
`python -m flows.batch INPUT OUTPUT [options]`."""

import sys

from prefect_llamacpp.flows import batch as _module
from prefect_llamacpp.flows.batch import BatchSummary, llamacpp_batch_flow, main

__all__ = ["BatchSummary", "llamacpp_batch_flow", "main"]

# Imported by name, this path is the package's module itself (every name; a patch here is a patch
# there); loaded from its file (a prefect.yaml entry point, `register -f`) it holds the names above.
if __name__ == "flows.batch":
    sys.modules[__name__] = _module
elif __name__ == "__main__":
    sys.exit(main())

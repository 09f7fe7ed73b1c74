"""The batch flow, defined in `prefect_llamacpp.flows.batch`: `prefect.yaml`'s entry point and
`python -m flows.batch INPUT OUTPUT [options]`."""

import sys

from prefect_llamacpp.flows.batch import BatchSummary, llamacpp_batch_flow, main

__all__ = ["BatchSummary", "llamacpp_batch_flow", "main"]

if __name__ == "__main__":
    sys.exit(main())

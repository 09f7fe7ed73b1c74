"""The health flow, defined in `prefect_llamacpp.flows.health`: `prefect.yaml`'s entry point and
`python -m flows.health [BLOCK ...]`."""

import sys

from prefect_llamacpp.flows.health import llamacpp_health_flow, main

__all__ = ["llamacpp_health_flow", "main"]

if __name__ == "__main__":
    sys.exit(main())

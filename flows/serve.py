"""Serve both flows from this process, without a work pool: `python -m flows.serve [BLOCK_NAME]`.

The health flow runs every 5 minutes; the batch flow runs when you trigger it (UI or
`prefect deployment run 'llamacpp-batch/llamacpp-batch' -p input_path=... -p output_path=...`).
"""

from __future__ import annotations

import sys

from prefect import serve

from prefect_llamacpp.blocks import DEFAULT_BLOCK_NAME
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from prefect_llamacpp.flows.health import llamacpp_health_flow

if __name__ == "__main__":
    block = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_BLOCK_NAME
    serve(
        llamacpp_health_flow.to_deployment(
            name="llamacpp-health", interval=300, parameters={"server": block}
        ),
        llamacpp_batch_flow.to_deployment(name="llamacpp-batch", parameters={"server": block}),
    )

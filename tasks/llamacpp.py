"""One Prefect task per question to a llama-server, defined in `prefect_llamacpp.tasks`."""

import sys

from prefect_llamacpp import tasks as _module
from prefect_llamacpp.tasks import (
    check_server,
    check_server_with_canary,
    detect_model,
    get_metrics,
    get_props,
    get_slots,
    wait_until_ready,
)

__all__ = [
    "check_server",
    "check_server_with_canary",
    "detect_model",
    "get_metrics",
    "get_props",
    "get_slots",
    "wait_until_ready",
]

# Imported by name, this path is the package's module itself (every name; a patch here is a patch
# there); loaded from its file (a prefect.yaml entry point, `register -f`) it holds the names above.
if __name__ == "tasks.llamacpp":
    sys.modules[__name__] = _module

"""One Prefect task per question to a llama-server, defined in `prefect_llamacpp.tasks`."""

from prefect_llamacpp.tasks import (
    check_health,
    check_health_with_canary,
    detect_model,
    get_metrics,
    get_props,
    get_slots,
    wait_until_ready,
)

__all__ = [
    "check_health",
    "check_health_with_canary",
    "detect_model",
    "get_metrics",
    "get_props",
    "get_slots",
    "wait_until_ready",
]

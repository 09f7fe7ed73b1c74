"""prefect-llamacpp: watch self-hosted llama.cpp servers and run batch LLM work through them, on
Prefect 3.

    from prefect_llamacpp import LlamaCppServer, llamacpp_batch_flow, llamacpp_health_flow

The public names below are loaded when first used, so the provider library
(`prefect_llamacpp.provider`, `.client`, `.config`, ...) can be imported without Prefect's
start-up cost; `LlamaCppServer`, the flows and the tasks bring Prefect with them. Register the
block type with `prefect block register -m prefect_llamacpp`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public name -> the module that defines it.
_EXPORTS = {
    # Prefect layer
    "LlamaCppServer": "blocks",
    "LlamaCppLaunch": "blocks",
    "llamacpp_managed_server_flow": "flows.managed_server",
    "llamacpp_health_flow": "flows.health",
    "HealthCanary": "flows.health",
    "HealthReport": "flows.health",
    "llamacpp_batch_flow": "flows.batch",
    "BatchSummary": "flows.batch",
    "RequestOptions": "batch.options",
    "RunOptions": "batch.options",
    "check_server": "tasks",
    "check_server_with_canary": "tasks",
    "detect_model": "tasks",
    "wait_until_ready": "tasks",
    "get_props": "tasks",
    "get_slots": "tasks",
    "get_metrics": "tasks",
    # provider library
    "LlamaCppProvider": "provider",
    "LlamaCppModel": "provider",
    "LlamaCppModelSettings": "provider",
    "create_llamacpp_model": "provider",
    "create_llamacpp_model_async": "provider",
    "create_llamacpp_embedding_model": "provider",
    "detect_llamacpp_model": "provider",
    "llamacpp_health_check": "provider",
    "llamacpp_model_settings": "provider",
    "server_model_profile": "provider",
    "is_transient_model_error": "provider",
    "llamacpp_durability": "durable",
    "llamacpp_task_config": "durable",
    "CanaryOptions": "canary",
    "LaunchSpec": "launch",
    "RestartPolicy": "launch",
    "llamacpp_server": "managed",
    "ManagedServer": "managed",
    "fetch_model": "model_cache",
    "LlamaCppSettings": "config",
    "LlamaCppClient": "client",
    "ProviderHealthStatus": "status",
    "ServerState": "status",
    "CanaryLatency": "status",
    "ServerCapabilities": "status",
    # errors (the tree is drawn in prefect_llamacpp/exceptions.py)
    "LlamaCppError": "exceptions",
    "ConfigurationError": "exceptions",
    "ModelError": "exceptions",
    "LaunchError": "exceptions",
    "TransportError": "exceptions",
    "ServerUnreachableError": "exceptions",
    "ServerTimeoutError": "exceptions",
    "ServerDisconnectedError": "exceptions",
    "ServerHTTPError": "exceptions",
    "ServerLoadingError": "exceptions",
    "UnauthorizedError": "exceptions",
    "NotSupportedError": "exceptions",
    "UnexpectedResponseError": "exceptions",
    "DeadlineExceededError": "exceptions",
    "AnswerError": "exceptions",
    "NoServerError": "exceptions",
    "ServerNotReadyError": "exceptions",
    "BlockNotFoundError": "exceptions",
    "BatchError": "exceptions",
    "BatchAbortedError": "exceptions",
    "BatchPathError": "exceptions",
    "LedgerInUseError": "exceptions",
    "LedgerSettingsError": "exceptions",
    "LedgerFormatError": "exceptions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_llamacpp' has no attribute {name!r}")
    value = getattr(import_module(f"prefect_llamacpp.{module}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from prefect_llamacpp.batch.options import RequestOptions, RunOptions
    from prefect_llamacpp.blocks import LlamaCppLaunch, LlamaCppServer
    from prefect_llamacpp.canary import CanaryOptions
    from prefect_llamacpp.client import LlamaCppClient
    from prefect_llamacpp.config import LlamaCppSettings
    from prefect_llamacpp.durable import llamacpp_durability, llamacpp_task_config
    from prefect_llamacpp.exceptions import (
        AnswerError,
        BatchAbortedError,
        BatchError,
        BatchPathError,
        BlockNotFoundError,
        ConfigurationError,
        DeadlineExceededError,
        LaunchError,
        LedgerFormatError,
        LedgerInUseError,
        LedgerSettingsError,
        LlamaCppError,
        ModelError,
        NoServerError,
        NotSupportedError,
        ServerDisconnectedError,
        ServerHTTPError,
        ServerLoadingError,
        ServerNotReadyError,
        ServerTimeoutError,
        ServerUnreachableError,
        TransportError,
        UnauthorizedError,
        UnexpectedResponseError,
    )
    from prefect_llamacpp.flows.batch import BatchSummary, llamacpp_batch_flow
    from prefect_llamacpp.flows.health import HealthCanary, HealthReport, llamacpp_health_flow
    from prefect_llamacpp.flows.managed_server import llamacpp_managed_server_flow
    from prefect_llamacpp.launch import LaunchSpec, RestartPolicy
    from prefect_llamacpp.managed import ManagedServer, llamacpp_server
    from prefect_llamacpp.model_cache import fetch_model
    from prefect_llamacpp.provider import (
        LlamaCppModel,
        LlamaCppModelSettings,
        LlamaCppProvider,
        create_llamacpp_embedding_model,
        create_llamacpp_model,
        create_llamacpp_model_async,
        detect_llamacpp_model,
        is_transient_model_error,
        llamacpp_health_check,
        llamacpp_model_settings,
        server_model_profile,
    )
    from prefect_llamacpp.status import (
        CanaryLatency,
        ProviderHealthStatus,
        ServerCapabilities,
        ServerState,
    )
    from prefect_llamacpp.tasks import (
        check_server,
        check_server_with_canary,
        detect_model,
        get_metrics,
        get_props,
        get_slots,
        wait_until_ready,
    )

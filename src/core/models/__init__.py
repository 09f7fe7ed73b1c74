"""The seed's `src.core.models`: the provider library's public names, from `prefect_llamacpp`."""

from prefect_llamacpp.provider import (
    LlamaCppModel,
    LlamaCppModelSettings,
    LlamaCppProvider,
    create_llamacpp_embedding_model,
    create_llamacpp_model,
    create_llamacpp_model_async,
    detect_llamacpp_model,
    llamacpp_health_check,
    llamacpp_model_settings,
)
from prefect_llamacpp.status import ProviderHealthStatus, ServerState

__all__ = [
    "LlamaCppModel",
    "LlamaCppModelSettings",
    "LlamaCppProvider",
    "ProviderHealthStatus",
    "ServerState",
    "create_llamacpp_embedding_model",
    "create_llamacpp_model",
    "create_llamacpp_model_async",
    "detect_llamacpp_model",
    "llamacpp_health_check",
    "llamacpp_model_settings",
]

"""The llama.cpp provider library: health checks, model detection, pydantic-ai models."""

from src.core.models.base_provider import ProviderHealthStatus, ServerState
from src.core.models.llamacpp_provider import (
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

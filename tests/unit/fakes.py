"""What llama-server answers, as respx routes (from ../shared/llama-server-api.md)."""

from __future__ import annotations

import httpx

ROOT = "http://llama.test:8080"

LOADING = httpx.Response(
    503, json={"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
)
UNAUTHORIZED = httpx.Response(
    401, json={"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
)
PROPS = {
    "total_slots": 4,
    "model_path": "/models/qwen3-0.6b-q8_0.gguf",
    "model_alias": "",
    "build_info": "b1-0c1e570",
    "is_sleeping": False,
    "default_generation_settings": {"n_ctx": 4096},
    "endpoint_slots": True,
    "endpoint_metrics": False,
}
MODELS = {
    "object": "list",
    "data": [{"id": "qwen3-0.6b-q8_0.gguf", "aliases": [], "owned_by": "llamacpp", "meta": {}}],
}


def ready_server(router, props=None, models=None):
    router.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    router.get(f"{ROOT}/props").respond(200, json=props or PROPS)
    router.get(f"{ROOT}/v1/models").respond(200, json=models or MODELS)

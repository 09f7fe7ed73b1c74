"""The one place that decides a llama-server's root URL and its OpenAI base URL.

llama-server serves `/health`, `/props`, `/slots`, `/metrics` at its root and the OpenAI API under
`/v1`. Users paste either. Only a trailing `/v1` path segment is stripped; a reverse-proxy prefix
(`https://gw.example.com/llama/v1` -> root `https://gw.example.com/llama`) is kept, and hosts or
paths that merely contain "v1" (`http://v1.example.com`, `/proxy/v10`) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from src.core.utils.exceptions import ModelError

_EXAMPLE = "a URL like http://localhost:8080 or http://localhost:8080/v1"


@dataclass(frozen=True)
class ServerURL:
    root: str
    """Server root without a trailing slash: `http://host:8080` or `https://gw/llama`."""

    @property
    def openai_base(self) -> str:
        """The OpenAI-compatible base URL (`<root>/v1`) for OpenAI clients and pydantic-ai."""
        return f"{self.root}/v1"

    def endpoint(self, path: str) -> str:
        return f"{self.root}/{path.lstrip('/')}"


def parse_server_url(url: str | None) -> ServerURL:
    """Normalise a server root or `/v1` URL. Raises `ModelError` naming a valid form when it is bad."""
    text = (url or "").strip()
    if not text:
        raise ModelError(f"The llama.cpp base URL is empty; set {_EXAMPLE}.")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(
            f"{text!r} is not a valid llama.cpp server URL: use {_EXAMPLE} "
            "(scheme http or https, then the host).",
            details={"base_url": text},
        )
    if parts.username or parts.password:
        # Keys in URLs end up in logs; the key has its own setting.
        raise ModelError(
            "Do not put credentials in the llama.cpp base URL; set the API key with "
            "LLAMACPP_API_KEY or the block's api_key field instead.",
        )
    if parts.query or parts.fragment:
        raise ModelError(
            f"The llama.cpp base URL must not carry a query or fragment; use {_EXAMPLE}.",
            details={"base_url": f"{parts.scheme}://{parts.netloc}{parts.path}"},
        )
    segments = [segment for segment in parts.path.split("/") if segment]
    if segments and segments[-1] == "v1":
        segments.pop()
    path = "/" + "/".join(segments) if segments else ""
    return ServerURL(root=urlunsplit((parts.scheme, parts.netloc, path, "", "")))

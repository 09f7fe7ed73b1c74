"""The one place that decides a llama-server's root URL and its OpenAI base URL.

llama-server serves `/health`, `/props`, `/slots`, `/metrics` at its root and the OpenAI API under
`/v1`. Users paste either. Only a trailing `/v1` path segment (any case) is stripped; a
reverse-proxy prefix (`https://gw.example.com/llama/v1` -> root `https://gw.example.com/llama`) is
kept, and hosts or paths that merely contain "v1" (`http://v1.example.com`, `/proxy/v10`) are left
alone. A bad URL is refused here, when it is parsed, never later as a raw httpx error; the message
never repeats credentials or a query string (where keys hide).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from prefect_llamacpp.exceptions import ConfigurationError

_EXAMPLE = "a URL like http://localhost:8080 or http://localhost:8080/v1"
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_BRACKETED = re.compile(r"^\[[0-9A-Fa-f:.%\w-]+\](:\d*)?$")


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
    """Normalise a server root or `/v1` URL. Raises `ConfigurationError` naming a valid form when it is bad."""
    text = (url or "").strip() if isinstance(url, str | None) else ""
    if not text:
        raise ConfigurationError(f"The llama.cpp base URL is empty; set {_EXAMPLE}.")
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise _invalid(text, "it cannot be parsed") from None
    if parts.username is not None or parts.password is not None:
        # Keys in URLs end up in logs; the key has its own setting.
        raise ConfigurationError(
            "Do not put credentials in the llama.cpp base URL; set the API key with "
            "LLAMACPP_API_KEY or the block's api_key field instead.",
        )
    if parts.query or parts.fragment or ";" in parts.path:
        raise ConfigurationError(
            "The llama.cpp base URL must not carry a query, fragment or ;parameters (keys belong in "
            f"LLAMACPP_API_KEY or the block's api_key field); use {_EXAMPLE}.",
            details={"base_url": _redacted(text)},
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _invalid(text, "the scheme must be http or https, then the host")
    if any(char.isspace() for char in text):
        raise _invalid(text, "it contains white space")
    try:
        parts.port  # noqa: B018 -- raises for ":abc" or ":99999"
    except ValueError:
        raise _invalid(text, "the port must be a number from 1 to 65535") from None
    if parts.port == 0 or parts.netloc.endswith(":"):
        raise _invalid(text, "the port must be a number from 1 to 65535")
    if not _valid_host(parts.netloc, parts.hostname):
        raise _invalid(text, f"{parts.hostname!r} is not a valid host name or IP address")
    segments = [segment for segment in parts.path.split("/") if segment]
    if segments and segments[-1].lower() == "v1":
        segments.pop()
    path = "/" + "/".join(segments) if segments else ""
    return ServerURL(root=urlunsplit((parts.scheme.lower(), parts.netloc, path, "", "")))


def server_url_at(host: str, port: int) -> ServerURL:
    """The URL of a server listening on `host`:`port` (plain HTTP); an IPv6 address gets its
    brackets here, given with or without them. Built, not checked: the port may not be chosen
    yet (0), and a host a user gives is checked where it is given (`check_host`)."""
    host, _ = _unbracketed(host)
    if ":" in host:
        host = f"[{host}]"
    return ServerURL(root=f"http://{host}:{port}")


def listens_everywhere(host: str) -> bool:
    """Whether a listening address is a wildcard (`0.0.0.0`, `::`, `[::]`, empty): every
    interface, reached by another name."""
    bare, _ = _unbracketed(host)
    with contextlib.suppress(ValueError):
        return not bare or ipaddress.ip_address(bare).is_unspecified
    return False


def check_host(host: str, what: str) -> str:
    """`host` if it is a bare host name or IP address (IPv6 with or without brackets), else a
    `ConfigurationError` naming `what` and the form it takes. The value is not repeated: a
    mistyped one may hold anything."""
    bare, bracketed = _unbracketed(host)
    if ":" in bare:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Address(bare))
    elif bare and not bracketed and _valid_host(bare, bare):
        return bare
    raise ConfigurationError(
        f"{what} must be a bare host name or IP address, like gpu-1.example.com, 10.0.0.5 or "
        "fd00::5: no scheme, port, path or user name."
    )


def _unbracketed(host: str) -> tuple[str, bool]:
    """`host` without the brackets an IPv6 address may come in, and whether it had them."""
    bracketed = host.startswith("[") and host.endswith("]")
    return (host[1:-1] if bracketed else host), bracketed


def _valid_host(netloc: str, host: str) -> bool:
    if "[" in netloc or "]" in netloc:
        if not _BRACKETED.match(netloc):
            return False
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    labels = host.rstrip(".").split(".")
    if labels[-1].isdigit() or any(label.lower().startswith("0x") for label in labels):
        # No top-level domain is numeric: this is meant as an IPv4 address; it must be one.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(_HOST_LABEL.match(label) for label in labels)


def _invalid(text: str, why: str) -> ConfigurationError:
    shown = _redacted(text)
    return ConfigurationError(
        f"{shown!r} is not a valid llama.cpp server URL ({why}): use {_EXAMPLE}.",
        details={"base_url": shown},
    )


def _redacted(text: str) -> str:
    """`text` without anything that may be a secret: user info (whatever the slashes before it),
    query, fragment and path parameters."""
    text = re.split(r"[?#;]", text, maxsplit=1)[0]
    if "@" in text:
        scheme, sep, rest = text.partition(":")
        if not sep or "/" in scheme or "@" in scheme:
            return "(a URL with '@' in it, not shown)"
        rest = rest.lstrip("/\\")
        host = rest.rsplit("@", 1)[1]
        return f"{scheme}://***@{host}"[:200]
    return text[:200]

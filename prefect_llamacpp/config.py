"""Settings: `LlamaCppSettings` is the one schema for connecting to a llama-server.

Read from the environment (`LLAMACPP_BASE_URL`, `LLAMACPP_API_KEY`, `LLAMACPP_TIMEOUT`,
`LLAMACPP_MODEL_NAME`) and from a `.env` file in the working directory. The Prefect block stores
the same fields by deriving from this model.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.server_url import ServerURL, parse_server_url

DEFAULT_BASE_URL = "http://localhost:8080/v1"
# The model a request names when none is set: single-model llama-server answers any name.
DEFAULT_MODEL_NAME = "llamacpp"
# What a form may accept as a base URL: http(s)://host[:port][/path], no inner space, credentials,
# query or fragment. `parse_server_url` decides; this is never stricter (a test holds it to that),
# so the UI can refuse obvious mistakes before saving. ECMA-262 syntax: no inline flags.
BASE_URL_PATTERN = r"^\s*[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@;]+(/[^\s?#;]*)?[?#]*\s*$"


class LlamaCppConnection(BaseModel):
    """How to reach one llama-server: the field list shared by the settings and the Prefect block.

    Every field has a value (no `None`), so Prefect's UIs show each as a plain input: the key a
    password input, the model name a text input. An empty key means "send no key"; an empty model
    name means "the model the server reports".
    """

    # A rejected value may hold a key (`http://admin:KEY@host`); validation errors never echo it.
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        title="Base URL",
        description="The server's root or its OpenAI base URL: http://gpu-1:8080/v1, "
        "http://gpu-1:8080, or behind a reverse proxy https://gw.example.com/llama/v1.",
        # For the UI only (it checks a pattern before saving); the validator below is the rule.
        json_schema_extra={"pattern": BASE_URL_PATTERN},
    )
    api_key: SecretStr = Field(
        default=SecretStr(""),
        title="API key",
        description="The key llama-server was started with (--api-key). Leave empty if it has "
        "none. Stored encrypted and shown masked.",
    )
    timeout: float = Field(
        default=30.0,
        gt=0,
        title="Timeout (seconds)",
        description="How long to wait for one HTTP answer from the server; more than 0.",
    )
    model_name: str = Field(
        default="",
        title="Model name",
        description="The model id to request (--alias or the GGUF file name; router mode needs "
        "one). Leave empty to use the model the server reports.",
    )

    @field_validator("base_url")
    @classmethod
    def _valid_server_url(cls, value: str) -> str:
        try:
            parse_server_url(value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from exc
        return value.strip()

    @field_validator("api_key", "model_name", mode="before")
    @classmethod
    def _trimmed_and_none_is_empty(cls, value):
        # None: a block saved before these fields had empty defaults, or a caller meaning "none".
        if value is None:
            return ""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _key_fits_a_header(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().isprintable():
            raise ValueError(
                "the API key contains a line break or another control character; paste it again"
            )
        if any(char.isspace() for char in value.get_secret_value()):
            raise ValueError("the API key contains a space; paste it again without it")
        if not value.get_secret_value().isascii():
            # An HTTP header carries ASCII only; llama-server's keys are ASCII.
            raise ValueError("the API key contains a character that is not ASCII; paste it again")
        return value

    @property
    def server_url(self) -> ServerURL:
        return parse_server_url(self.base_url)

    def api_key_value(self) -> str | None:
        """The key in clear text, None when empty: only for building an HTTP client's headers."""
        return self.api_key.get_secret_value() or None


class LlamaCppSettings(LlamaCppConnection, BaseSettings):
    """`LlamaCppConnection` read from `LLAMACPP_*` environment variables and `.env`."""

    model_config = SettingsConfigDict(
        env_prefix="LLAMACPP_",
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
        hide_input_in_errors=True,
    )


def check_pushgateway_url(value: str) -> str:
    """A Pushgateway address (`http://host:9091`), or empty for none. Raises ValueError naming
    the fix; the message never repeats a password."""
    value = value.strip()
    if not value:
        return ""
    example = "a Pushgateway address looks like http://host:9091"
    if any(char.isspace() or not char.isprintable() for char in value):
        raise ValueError(f"{example}: no spaces or control characters")
    # Before any parsing: a parser's own error would quote the address, password included.
    if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
        raise ValueError(
            "the Pushgateway address holds credentials; give it without them (a gateway that "
            "needs a password goes behind a proxy that adds it)"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # a port that is not a number or above 65535, a broken [IPv6]
        raise ValueError(example) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(example)
    if "?" in value or "#" in value:
        raise ValueError(f"{example}, with no ?query or #fragment")
    if parts.path.strip("/"):
        # The client adds /metrics/job/...: a path here would be a proxy's prefix, and a
        # gateway's own URL pasted with /metrics is the usual mistake.
        if parts.path.rstrip("/").endswith("/metrics"):
            raise ValueError(f"{example}, without /metrics (the client adds it)")
    return value.rstrip("/")


class MetricsSettings(BaseSettings):
    """Where the flows push Prometheus metrics: `LLAMACPP_PUSHGATEWAY_URL` (empty: nowhere)."""

    model_config = SettingsConfigDict(
        env_prefix="LLAMACPP_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    pushgateway_url: str = Field(
        default="",
        description="A Prometheus Pushgateway (http://host:9091) the health and batch flows push "
        "their figures to. Empty: no push.",
    )

    @field_validator("pushgateway_url")
    @classmethod
    def _valid_gateway(cls, value: str) -> str:
        return check_pushgateway_url(value)


class Settings(BaseSettings):
    """Root settings object; the llama.cpp section lives under `.llamacpp`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()` to reload."""
    return Settings()

"""Settings: `LlamaCppSettings` is the one schema for connecting to a llama-server.

Read from the environment (`LLAMACPP_BASE_URL`, `LLAMACPP_API_KEY`, `LLAMACPP_TIMEOUT`,
`LLAMACPP_MODEL_NAME`) and from a `.env` file in the working directory. The Prefect block stores
the same fields by deriving from this model.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from src.core.utils.exceptions import ModelError
from src.core.utils.server_url import ServerURL, parse_server_url

DEFAULT_BASE_URL = "http://localhost:8080/v1"


class LlamaCppConnection(BaseModel):
    """How to reach one llama-server: the field list shared by the settings and the Prefect block."""

    # A rejected value may hold a key (`http://admin:KEY@host`); validation errors never echo it.
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="The server's root or OpenAI base URL, e.g. http://localhost:8080/v1.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The key the server was started with (--api-key); leave empty if none.",
    )
    timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for one HTTP answer from the server."
    )
    model_name: str | None = Field(
        default=None,
        description="Model id to request; leave empty to use the model the server reports.",
    )

    @field_validator("base_url")
    @classmethod
    def _valid_server_url(cls, value: str) -> str:
        try:
            parse_server_url(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        return value.strip()

    @field_validator("api_key", "model_name", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _key_fits_a_header(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().isprintable():
            raise ValueError(
                "the API key contains a line break or another control character; paste it again"
            )
        if value is not None and any(char.isspace() for char in value.get_secret_value()):
            raise ValueError("the API key contains a space; paste it again without it")
        return value

    @property
    def server_url(self) -> ServerURL:
        return parse_server_url(self.base_url)

    def api_key_value(self) -> str | None:
        """The key in clear text: only for building an HTTP client's headers."""
        return self.api_key.get_secret_value() if self.api_key else None


class LlamaCppSettings(LlamaCppConnection, BaseSettings):
    """`LlamaCppConnection` read from `LLAMACPP_*` environment variables and `.env`."""

    model_config = SettingsConfigDict(
        env_prefix="LLAMACPP_",
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
        hide_input_in_errors=True,
    )


class Settings(BaseSettings):
    """Root settings object; the llama.cpp section lives under `.llamacpp`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()` to reload."""
    return Settings()

"""Shared fixtures: clean settings for every test, no stray LLAMACPP_* from the developer's shell."""

from __future__ import annotations

import os

import pytest

# Prefect's temporary test server otherwise races its own telemetry write ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect_llamacpp.config import get_settings

SECRET_KEY = "sk-test-very-secret-8c1f3e"

pytest_plugins = ["tests.servers", "tests.object_storage"]


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch, tmp_path):
    for name in (
        "LLAMACPP_BASE_URL",
        "LLAMACPP_API_KEY",
        "LLAMACPP_TIMEOUT",
        "LLAMACPP_MODEL_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no developer .env leaks in
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()

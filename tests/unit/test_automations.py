"""automations/llamacpp-alerts.yaml: valid for Prefect, and in step with the health states."""

from __future__ import annotations

import uuid

import pytest
import yaml

from automations.install import ALERTS_FILE, PLACEHOLDER, main, render
from prefect_llamacpp import ServerState

HEALTHY = {ServerState.READY, ServerState.SLEEPING, ServerState.BUSY}


def by_name(automations):
    return {automation["name"]: automation for automation in automations}


def test_rendered_file_names_the_block_and_sets_the_window():
    block_id = str(uuid.uuid4())
    automations = by_name(render(block_id, window_s=42))
    assert set(automations) == {"llamacpp-server-unhealthy", "llamacpp-server-silent"}
    for automation in automations.values():
        (action,) = automation["actions"]
        assert action["type"] == "send-notification"
        assert action["block_document_id"] == block_id
        assert "{{ event.resource.name }}" in action["subject"]
    assert automations["llamacpp-server-silent"]["trigger"]["within"] == 42
    assert automations["llamacpp-server-unhealthy"]["trigger"]["within"] == 0
    assert PLACEHOLDER not in yaml.safe_dump(list(automations.values()))


def test_reactive_alert_covers_every_state_but_the_healthy_ones():
    trigger = by_name(render(str(uuid.uuid4())))["llamacpp-server-unhealthy"]["trigger"]
    assert trigger["posture"] == "Reactive"
    assert set(trigger["expect"]) == {f"llamacpp.server.{s}" for s in set(ServerState) - HEALTHY}


def test_proactive_alert_expects_a_healthy_report_per_server_within_15_minutes():
    trigger = by_name(render(str(uuid.uuid4())))["llamacpp-server-silent"]["trigger"]
    assert trigger["posture"] == "Proactive"
    assert trigger["within"] == 900
    assert set(trigger["expect"]) == {f"llamacpp.server.{s}" for s in HEALTHY}
    assert trigger["after"] == ["llamacpp.server.*"]  # any report opens a server's window
    assert trigger["for_each"] == ["prefect.resource.id"]


def test_the_file_in_the_repository_keeps_the_placeholder():
    assert ALERTS_FILE.read_text().count(f"block_document_id: {PLACEHOLDER}") == 2


async def test_installer_refuses_without_a_prefect_server(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert await main(["--notify", "slack-webhook/alerts"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["alerts", "/alerts", "slack-webhook/"])
async def test_installer_says_how_to_name_the_block(name, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert await main(["--notify", name]) == 2
    assert "<block type slug>/<block name>" in capsys.readouterr().err


async def test_installer_refuses_a_window_prefect_would_refuse(capsys):
    assert await main(["--notify", "slack-webhook/alerts", "--window", "5"]) == 2
    assert "at least 10 seconds" in capsys.readouterr().err

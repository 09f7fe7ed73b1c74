"""Install the alert automations of `llamacpp-alerts.yaml` on the Prefect server you point at.

    python -m automations.install --notify slack-webhook/llamacpp-alerts [--window 900] [--replace]
    python -m automations.install --notify custom-webhook/pager --print > alerts.yaml

The file's `NOTIFICATION_BLOCK_ID` placeholders become the id of the notification block you
name (`<block type slug>/<block name>`, as `prefect block ls` shows it), `--window` sets the
proactive automation's window, and the result goes to `prefect automation create --from-file`.
`--replace` first deletes automations with the same names, so running it twice leaves one set.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

ALERTS_FILE = Path(__file__).with_name("llamacpp-alerts.yaml")
PLACEHOLDER = "NOTIFICATION_BLOCK_ID"
DEFAULT_WINDOW_S = 900
MIN_WINDOW_S = 10  # Prefect refuses shorter windows for proactive triggers


class AutomationSetupError(RuntimeError):
    """The automations cannot be installed as asked; the message says what to fix."""


def render(block_document_id: str, window_s: float = DEFAULT_WINDOW_S) -> list[dict[str, Any]]:
    """The file's automations with the block id and window filled in, validated by Prefect."""
    automations = yaml.safe_load(ALERTS_FILE.read_text())["automations"]
    for automation in automations:
        for action in automation["actions"]:
            if action.get("block_document_id") == PLACEHOLDER:
                action["block_document_id"] = block_document_id
        if automation["trigger"].get("posture") == Posture.Proactive.value:
            automation["trigger"]["within"] = window_s
        try:  # fail here, not half-way through creating them
            AutomationCore.model_validate(automation)
        except ValidationError as exc:
            raise AutomationSetupError(f"automation {automation['name']!r}: {exc}") from None
    return automations


async def notification_block_id(name: str) -> str:
    """The id of the block named `<block type slug>/<block name>`; it must be able to notify."""
    slug, _, block_name = name.partition("/")
    if not slug or not block_name:
        raise AutomationSetupError(
            f"--notify {name!r}: name the block as <block type slug>/<block name>, e.g. "
            "slack-webhook/llamacpp-alerts or custom-webhook/pager (see `prefect block ls`)"
        )
    async with get_client() as client:
        try:
            document = await client.read_block_document_by_name(
                block_name, slug, include_secrets=False
            )
        except ObjectNotFound:
            raise AutomationSetupError(
                f"no block {name!r} on this Prefect server. Create it in the UI (Blocks -> +) "
                "or in Python, e.g. `SlackWebhook(url=...).save('llamacpp-alerts')` from "
                "prefect.blocks.notifications; `prefect block ls` lists the existing ones"
            ) from None
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise AutomationSetupError(
            f"block {name!r} cannot send notifications; name a Slack Webhook, Custom Webhook, "
            "Microsoft Teams, PagerDuty, ... block"
        )
    return str(document.id)


async def delete_same_names(automations: list[dict[str, Any]]) -> int:
    deleted = 0
    async with get_client() as client:
        for automation in automations:
            for existing in await client.read_automations_by_name(automation["name"]):
                await client.delete_automation(existing.id)
                deleted += 1
    return deleted


def create_from_file(automations: list[dict[str, Any]]) -> int:
    """`prefect automation create --from-file` on the rendered automations; its exit code."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "llamacpp-alerts.yaml"
        path.write_text(yaml.safe_dump({"automations": automations}, sort_keys=False))
        command = [sys.executable, "-m", "prefect", "automation", "create", "--from-file"]
        return subprocess.run([*command, str(path)], check=False).returncode


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notify", required=True, help="notification block as <type slug>/<name>")
    parser.add_argument(
        "--window",
        type=float,
        default=DEFAULT_WINDOW_S,
        help="seconds without a healthy report before the proactive alert (default 900)",
    )
    parser.add_argument("--replace", action="store_true", help="delete same-named ones first")
    parser.add_argument(
        "--print", action="store_true", help="print the rendered file instead of creating"
    )
    args = parser.parse_args(argv)
    if args.window < MIN_WINDOW_S:
        print(f"error: --window must be at least {MIN_WINDOW_S} seconds", file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        # Without it the Prefect client would start a throwaway local server and install there.
        print(
            "error: PREFECT_API_URL is not set; point it at your Prefect server, e.g. "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
        return 2
    try:
        automations = render(await notification_block_id(args.notify), args.window)
    except AutomationSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(yaml.safe_dump({"automations": automations}, sort_keys=False), end="")
        return 0
    if args.replace and (deleted := await delete_same_names(automations)):
        print(f"Deleted {deleted} existing automation(s) with the same names.")
    return create_from_file(automations)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""The batch flow's run form in Prefect's new UI (the default, under `/v2`), in a real browser.

A real `prefect server start`, a deployment of `llamacpp_batch_flow` on it (no work pool, no
worker: the run it creates is never executed), and Debian's Chromium driven by Playwright on the
deployment's "Custom run" form (deployment page, Run, Custom run). The options show GROUPED (the
`request` and `run` parameters as boxes holding exactly the fields of `RequestOptions` and
`RunOptions`), with each field's DESCRIPTION under its title, and VALIDATED: a max tokens of 0
is refused by the browser (the schema's `minimum` is the input's `min`), a ready timeout of 0
(`exclusiveMinimum`, which no input attribute carries) by Prefect's own check, shown under the
field; the corrected values create a flow run whose parameters hold them, nested.

The classic UI (at the root) renders the same groups and descriptions and refuses the max tokens
of 0 itself ("0 is not valid under any of the given schemas"); it is not driven here: one UI is
enough, and the new one is what the server serves by default.
"""

from __future__ import annotations

import re
import time
from uuid import UUID

import pytest
from playwright.sync_api import Locator, Page, Response, expect
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from pydantic import BaseModel

from harness.prefect_server import talking_to
from prefect_llamacpp.batch.options import RequestOptions, RunOptions
from prefect_llamacpp.flows.batch import llamacpp_batch_flow

pytestmark = pytest.mark.integration

GROUPS: dict[str, type[BaseModel]] = {"request": RequestOptions, "run": RunOptions}
# The box a field's title, description and input share: the nearest `group` above its label.
FIELD_BLOCK = (
    "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' group ')][1]"
)


def title(model: type[BaseModel], name: str) -> str:
    """A field's title as the schema Prefect sends the UI has it ("Max Tokens")."""
    return model.model_json_schema()["properties"][name]["title"]


def shown_title(text: str) -> re.Pattern[str]:
    """A label's text: the title, with " (Optional)" after it when the field has a default."""
    return re.compile(rf"^{re.escape(text)}( \(Optional\))?$")


def field_block(scope: Page | Locator, text: str) -> Locator:
    return scope.locator("label").filter(has_text=shown_title(text)).locator(FIELD_BLOCK)


def field_input(page: Page, text: str) -> Locator:
    """A field's input. Not `get_by_label`: for a field that may be None (`int | None`) the
    label's `for` names the int/None switch's id, which no element has, not the input."""
    return field_block(page, text).locator("input, textarea").first


def is_create(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/create_flow_run")


def is_validation(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/ui/schemas/validate")


@pytest.fixture(scope="module")
def deployment_id(prefect_with_ui) -> str:
    with talking_to(prefect_with_ui.api):
        # `_sync=True`: with Playwright's event loop running on this thread (the module's
        # browser may be up already), Prefect would hand back coroutines otherwise.
        deployment = llamacpp_batch_flow.to_deployment(name="batch-form", _sync=True)
        return str(deployment.apply(_sync=True))


def test_the_batch_run_form_shows_the_options_grouped_described_and_validated(
    browser, prefect_with_ui, deployment_id, screens
):  # `browser` first: without Chromium, fail before starting the server
    prefect = prefect_with_ui
    page = screens.new_page()
    deployment_page = f"{prefect.url}/v2/deployments/deployment/{deployment_id}"
    # Custom run opens `/run?parameters={}` (the defaults the form starts from).
    form_url = re.compile(rf"^{re.escape(deployment_page)}/run(\?.*)?$")

    with screens.during("new UI: deployment page, Run, Custom run"):
        page.goto(deployment_page)
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Custom run").click()
        expect(page).to_have_url(form_url)
        expect(page.get_by_text("Parameters", exact=True)).to_be_visible()

    with screens.during("the options, grouped, each with its description"):
        assert title(RequestOptions, "max_tokens") == "Max Tokens"
        assert title(RunOptions, "chunk_size") == "Chunk Size"
        for group, model in GROUPS.items():
            box = field_block(page, group)
            expect(box).to_be_visible()
            # The group's title, then exactly its model's fields, in order: a flat form (the
            # options as top-level parameters) has no such box, a mixed one other titles.
            titles = [group] + [title(model, name) for name in model.model_fields]
            expect(box.locator("label")).to_have_text([shown_title(t) for t in titles])
            for name, info in model.model_fields.items():
                assert info.description, f"{model.__name__}.{name} has no description"
                block = field_block(box, title(model, name))
                expect(block.get_by_text(info.description, exact=True)).to_be_visible()
        # The flow's own parameters stay outside the groups.
        for name in ("input_path", "output_path", "server", "output_format"):
            expect(field_block(page, name)).to_be_visible()
            for group in GROUPS:
                expect(field_block(page, group).get_by_text(shown_title(name))).to_have_count(0)

    submit = page.get_by_role("button", name="Submit")
    creates: list[Response] = []  # every create_flow_run the page sends, with its answer
    page.on("response", lambda response: creates.append(response) if is_create(response) else None)

    with screens.during("max tokens 0: the browser refuses the form"):
        field_input(page, "input_path").fill("/data/prompts.jsonl")
        field_input(page, "output_path").fill("/data/results.jsonl")
        max_tokens = field_input(page, "Max Tokens")
        expect(max_tokens).to_have_value("512")  # RequestOptions' default
        max_tokens.fill("0")
        submit.click()
        # Chromium's own bubble says why (a screenshot cannot hold it): the schema's minimum.
        expect(max_tokens).to_be_focused()
        check = max_tokens.evaluate(
            "e => ({underflow: e.validity.rangeUnderflow, message: e.validationMessage})"
        )
        assert check["underflow"], check
        assert re.search(r"greater than or equal to 1\b", check["message"]), check
        expect(page).to_have_url(form_url)
        assert creates == []

    with screens.during("ready timeout 0: Prefect refuses it, under the field"):
        max_tokens.fill("7")
        assert max_tokens.evaluate("e => e.validationMessage") == ""
        ready_timeout = field_input(page, "Ready Timeout")
        expect(ready_timeout).to_have_value("300")  # RunOptions' default
        ready_timeout.fill("0")
        submit.click()
        problem = field_block(page, "Ready Timeout").get_by_text(re.compile("minimum"))
        expect(problem).to_be_visible()
        # Prefect 3.9.1's new UI sends the run anyway (its check reads the errors of the
        # previous validation, not this one's): the server refuses it (the deployment enforces
        # the schema), and the notice of that names the field by its place in the group.
        notice = page.get_by_text(re.compile(r"run\.ready_timeout"))
        expect(notice).to_be_visible()
        expect(page).to_have_url(form_url)
        assert [response.status for response in creates] == [409]
        # The notice sits over Submit, and stays while the pointer rests on it: move away and
        # let it go, as a user would, before submitting again.
        page.mouse.move(0, 0)
        expect(notice).to_have_count(0)

    with screens.during("valid values: the run is created with them, nested"):
        ready_timeout.fill("5")
        field_input(page, "Chunk Size").fill("50")
        with page.expect_response(is_validation) as validated:
            submit.click()
        assert validated.value.json() == {"errors": [], "valid": True}
        expect(problem).to_have_count(0)
        # The same stale check: right after a refusal, Submit only validates (and clears the
        # message), as above; a user clicks again. Should Prefect send the run the first time,
        # it shows here within the few seconds a click takes, and is taken.
        deadline = time.monotonic() + 3
        while len(creates) == 1 and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        if len(creates) == 1:
            with page.expect_response(is_create):
                submit.click()
        assert [response.status for response in creates] == [409, 201], creates
        run_id = UUID(creates[-1].json()["id"])
        expect(page).not_to_have_url(form_url)

    with screens.during("read the run back through the Prefect client"):
        with talking_to(prefect.api):
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(run_id)
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[UUID(deployment_id)])
                    )
                )
        parameters = flow_run.parameters
        assert parameters["request"]["max_tokens"] == 7
        assert parameters["run"]["ready_timeout"] == 5
        assert parameters["run"]["chunk_size"] == 50
        assert parameters["input_path"] == "/data/prompts.jsonl"
        assert parameters["output_path"] == "/data/results.jsonl"
        # The rest of each group at its defaults, as the flow will read them.
        assert RequestOptions.model_validate(parameters["request"]) == RequestOptions(max_tokens=7)
        assert RunOptions.model_validate(parameters["run"]) == RunOptions(
            ready_timeout=5, chunk_size=50
        )
        # The refused submits created nothing.
        assert [run.id for run in runs] == [run_id]

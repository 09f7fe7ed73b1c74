"""One batch run per object-storage output, across nodes: a Prefect global concurrency limit of
one slot per output, held with a lease for the run's life.

The flock that guards a local output means nothing across machines; the Prefect server every
worker talks to is the one place they share. The lease is renewed while the run lives and lapses
`lease_seconds` after its holder dies (SIGKILL, a lost node), so the output is free again then.
A run whose lease cannot be renewed is stopped (Prefect cancels it), so two runs never write one
output believing they hold it; if one ever does, the parts' create-only writes stop the later.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_llamacpp.exceptions import LedgerInUseError
from prefect_llamacpp.storage import canonical_url, shown


def lease_name(url: str) -> str:
    """The limit's name: readable in the Prefect UI (the object's name), unique (a hash of the
    whole URL), and free of the characters Prefect refuses in names."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rsplit("/", 1)[-1])[:40].strip("-")
    return f"llamacpp-output-{base}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


@asynccontextmanager
async def output_lease(url: str, lease_seconds: float) -> AsyncIterator[str]:
    """Hold `url`'s lease for the body; yields the limit's name. `LedgerInUseError` at once
    (nothing waits) when another run holds it."""
    name = lease_name(canonical_url(url))
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            limit = None
        if limit is None:
            try:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
        elif limit.limit != 1 or not limit.active:
            # One slot, active: a limit edited by hand would let two runs in.
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )
    context = FlowRunContext.get()
    holder = (
        ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)
        if context is not None and context.flow_run is not None
        else None
    )
    held = False
    try:
        async with concurrency(
            name,
            occupy=1,
            max_retries=0,  # held by another run: refused now, not waited for
            lease_duration=lease_seconds,
            strict=True,
            holder=holder,
            raise_on_lease_renewal_failure=True,
        ):
            held = True
            yield name
    except ConcurrencySlotAcquisitionError as exc:
        cause = exc.__cause__
        locked = isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423
        if held or not locked:
            raise
        raise LedgerInUseError(
            f"output {shown(url)} is in use by another batch run (it holds the output's lease, "
            f"the Prefect concurrency limit {name!r}); wait for that run to end (a run that "
            f"died frees it within {lease_seconds:g} s) or give another output path. "
            "Nothing was sent."
        ) from None

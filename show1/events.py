"""Prefect events show1 emits (`show1.data.ingested`), for automations on the Prefect server to trigger on.

Prefect's `emit_event` hands an event to a background worker that sends it later; a short command may exit first,
and a failure is only logged. `send` instead opens Prefect's events client itself and returns once the server has
confirmed the event (the client's checkpoint after every event: a websocket ping answered after the event), so a
command knows its event arrived, or raises `EventNotSent`. Inside a flow or task run, the run is attached as a
related resource, as `emit_event` does.

With no server configured (no PREFECT_API_URL) nothing is sent: each command's temporary local API has no
automations to trigger and goes away with the command.
"""

from __future__ import annotations

import asyncio
from typing import Any

from show1.config import prefect_api_url


class EventNotSent(RuntimeError):
    """The Prefect server did not take the event; the message names the server and the reason."""


def server() -> str | None:
    """The Prefect server events go to (PREFECT_API_URL), or None."""
    return prefect_api_url()


def send(event: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
    """Send one event to the Prefect server at PREFECT_API_URL; return its id once the server has it."""
    api = server()
    if api is None:
        raise EventNotSent("no Prefect server configured (PREFECT_API_URL): the event was not sent")
    try:
        return asyncio.run(_send(event, resource, payload))
    except EventNotSent:
        raise
    except Exception as exc:  # the client's own errors: refused connections, closed sockets, a server too old
        raise EventNotSent(f"{api}: the event {event} was not delivered ({type(exc).__name__}: {exc})") from None


async def _send(name: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
    from prefect.client.orchestration import get_client
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.events.related import related_resources_from_run_context

    event = Event(event=name, resource=resource, payload=payload)
    async with get_client() as orchestration:  # the flow and task run this is sent from, if any
        event.related += await related_resources_from_run_context(orchestration, exclude={event.resource.id})
    async with get_events_client(reconnection_attempts=3, checkpoint_every=1) as client:
        await client.emit(event)  # sent, then confirmed (checkpoint_every=1)
    return str(event.id)

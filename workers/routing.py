"""Which actors each event feeds. The relay enqueues one message per (event, actor)."""

from __future__ import annotations

EVENT_ACTORS: dict[str, tuple[str, ...]] = {
    "user.registered": ("send_welcome_email",),
}


def actors_for(event_type: str) -> tuple[str, ...]:
    """The actor names an event is delivered to (possibly none: activity-only events)."""
    return EVENT_ACTORS.get(event_type, ())

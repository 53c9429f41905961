"""One short hook for the middlewares that act on how a message ended."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy


class OutcomeMiddleware(dramatiq.Middleware):
    """A Dramatiq middleware told through :meth:`message_ended` that a message ran
    (``exception`` is ``None`` when it succeeded). Subclasses override that one method instead
    of Dramatiq's ``after_process_message`` and its keyword-only signature."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Dramatiq's hook: hands the outcome to :meth:`message_ended`."""
        self.message_ended(broker, message, exception)

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Called once for every message processed by this process."""

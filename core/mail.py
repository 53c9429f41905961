"""Outgoing email: a base, an SMTP implementation and a log-only one (no ``SMTP_URL``)."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlparse

from config.logging import get_logger

log = get_logger(__name__)


class Mailer:
    """Sends one message; raises on failure so the actor can retry."""

    async def send(self, message: EmailMessage) -> None:
        """Deliver ``message``."""
        raise NotImplementedError


class SmtpMailer(Mailer):
    """SMTP from ``smtp://[user:pass@]host:port`` (``smtps://`` for implicit TLS,
    ``?starttls=1`` to upgrade)."""

    def __init__(self, url: str, *, timeout: float = 10.0):
        parsed = urlparse(url)
        if parsed.scheme not in ("smtp", "smtps") or not parsed.hostname:
            raise ValueError(f"SMTP_URL must look like smtp://host:port, got {url!r}")
        tls = parsed.scheme == "smtps"
        #: What :func:`aiosmtplib.send` is given besides the message.
        self.options: dict[str, Any] = {
            "hostname": parsed.hostname,
            "port": parsed.port or (465 if tls else 25),
            "username": unquote(parsed.username) if parsed.username else None,
            "password": unquote(parsed.password) if parsed.password else None,
            "use_tls": tls,
            "start_tls": "starttls=1" in parsed.query,
            "timeout": timeout,
        }

    async def send(self, message: EmailMessage) -> None:
        # Imported on first use: of the processes that import this module only the workers
        # that send email need the SMTP client.
        import aiosmtplib

        await aiosmtplib.send(message, **self.options)


class LogMailer(Mailer):
    """Writes messages to the log instead of sending them (development default)."""

    async def send(self, message: EmailMessage) -> None:
        log.info(
            "mail.logged_not_sent",
            to=message["To"],
            subject=message["Subject"],
            body=message.get_content()[:500],
        )


def build_mailer(smtp_url: str | None) -> Mailer:
    """The mailer for a configuration."""
    return SmtpMailer(smtp_url) if smtp_url else LogMailer()

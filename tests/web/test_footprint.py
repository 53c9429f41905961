"""What a web process keeps in memory: packages it uses for one small thing are not imported.

Each was measured in a web process (``python -m bench api`` reports its RSS): zxcvbn's
package builds the ranked dictionaries of all its lists (14.5 MB) where the check of a new
password needs only its list of common passwords (``core/account_rules.py``); swagger-ui-py
loads 44 modules (2.4 MB) where the app needs only the folder of its files (``web/app.py``);
fakeredis is for tests and ``REDIS_URL=memory://`` (``config/connections.py``); Sentry's SDK
(with urllib3, 3.2 MB here) only where ``SENTRY_DSN`` is set (``config/sentry.py``); pika (2.5 MB)
only where the broker is RabbitMQ (``workers/broker.py``, ``workers/queue_inspector.py``); the
SMTP client only when a worker sends mail (``core/mail.py``); cryptography's compiled binding
(8.5 MB) only when a secret is sealed (``config/__init__.py`` keeps it out of PyJWT's and
PyMongo's optional imports, ``core.security.seal`` imports it); Rich and Pygments (2.9 MB), which
structlog imports where a development tool installed them, never (the console prints plain
tracebacks). Run in a fresh interpreter, since this test process imports them all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import cli.main  # first, as in `taskmanager web`
from config.settings import Settings
from core import account_rules
from web.app import create_app

app = create_app(Settings(jwt_secret="x" * 40, redis_url="redis://127.0.0.1:6379/0"))
assert any(r.canonical == "/docs/static" for r in app.router.resources())
account_rules.check_password("correct horse battery staple")
try:
    account_rules.check_password("Password1")
except ValueError:
    pass
else:
    raise SystemExit("a common password was accepted")
heavy = (
    "zxcvbn", "swagger_ui", "fakeredis", "sentry_sdk", "pika", "aiosmtplib",
    "cryptography.hazmat.bindings._rust", "cryptography.x509", "rich", "pygments",
)
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""


def test_the_web_app_and_a_password_check_import_no_heavy_extras() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


SEALING = """
import sys
from core.security import seal, unseal
from web.app import create_app
from config.settings import Settings

create_app(Settings(jwt_secret="x" * 40, redis_url="redis://127.0.0.1:6379/0"))
before = "cryptography.hazmat.bindings._rust" in sys.modules
assert unseal(b"k" * 32, seal(b"k" * 32, b"plain", "id-1"), "id-1") == b"plain"
print(before, "cryptography.hazmat.bindings._rust" in sys.modules)
"""


def test_cryptography_is_imported_by_the_first_seal() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SEALING], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]

"""The Procfile names the production processes, each a real ``taskmanager`` command; webhook
deliveries run in a worker process of their own."""

from __future__ import annotations

import shlex
from pathlib import Path

from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = shlex.split(command)
    return entries


def test_procfile_runs_web_workers_scheduler_and_archiver() -> None:
    entries = procfile()
    assert set(entries) == {"web", "worker", "worker-webhooks", "scheduler", "archiver"}
    for name, argv in entries.items():
        assert argv[:2] == ["taskmanager", name.split("-")[0]], argv
        # The command and its options parse (``--help`` after them runs nothing).
        result = CliRunner().invoke(main, [*argv[1:], "--help"])
        assert result.exit_code == 0, result.output


def test_webhook_deliveries_have_their_own_worker_process() -> None:
    from tests.deploy.test_manifests import app_queues, queues_of

    general, hooks = app_queues()
    entries = procfile()
    assert queues_of(entries["worker"]) == general
    assert queues_of(entries["worker-webhooks"]) == hooks

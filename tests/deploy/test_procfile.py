"""The Procfile names the three production processes, each a real ``taskmanager`` command."""

from __future__ import annotations

import shlex
from pathlib import Path

from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_procfile_runs_web_worker_and_scheduler() -> None:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = shlex.split(command)
    assert set(entries) == {"web", "worker", "scheduler"}
    for name, argv in entries.items():
        assert argv[:2] == ["taskmanager", name], argv
        # The command and its options parse (``--help`` after them runs nothing).
        result = CliRunner().invoke(main, [*argv[1:], "--help"])
        assert result.exit_code == 0, result.output

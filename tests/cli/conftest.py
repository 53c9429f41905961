"""Shared by the operator command tests (tests/cli/test_*_cli.py): running a command in-process
and its environment without a ``JWT_SECRET``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import main
from config.settings import Settings


def invoke(*args: str) -> Result:
    """Run ``taskmanager ARGS`` in this process; exceptions propagate."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def ops_env(cli_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """``cli_env`` without a ``JWT_SECRET`` (read-only commands must not need one), in an
    empty directory (no ``taskmanager run`` data directory around)."""
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.chdir(tmp_path)
    return cli_env

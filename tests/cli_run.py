"""`vlchat ARGS` run in the test's own process (fast: no interpreter start, no re-import)."""

from __future__ import annotations

import sys

import pytest

from vlchat import cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `vlchat ARGS` through `cli.main` (VlchatError -> exit 2)."""
    capsys.readouterr()  # drop what came before (progress bars)
    monkeypatch.setattr(sys, "argv", ["vlchat", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
        sys.exit(0)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err

"""The python tool's sandbox: results and errors, then hostile code that must end as a clear
observation within the limits while this process carries on. Time bounds are generous: CI has
2 cores and other work beside it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlchat.agent.builtin.sandbox import NOBODY, SandboxConfig, namespaces_available, python_tool, run_python
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.tools import ToolRegistry

LIMITS = SandboxConfig(wall_s=4, cpu_s=2, memory_bytes=256 << 20, file_bytes=1 << 20, max_output_chars=500)
needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="namespaces need root and unshare/setpriv")


@pytest.fixture(scope="module")
def executor() -> ToolExecutor:
    return ToolExecutor(ToolRegistry([python_tool(LIMITS)]))


def run(executor: ToolExecutor, code: str, max_s: float = 10):
    start = time.monotonic()
    obs = executor.run("python", {"code": code})
    assert time.monotonic() - start < max_s, obs
    return obs


def test_prints_and_the_last_expression_are_returned(executor):
    obs = run(executor, "x = 6\nprint('seven', 7)\nx * 7")
    assert obs.ok and obs.data == {"stdout": "seven 7\n", "result": "42"}
    assert run(executor, "y = 1").data == {"stdout": "", "result": None}  # no last expression


def test_an_exception_is_an_observation_with_its_traceback(executor):
    obs = run(executor, "print('before')\n1 / 0")
    assert not obs.ok and obs.error == "the code raised ZeroDivisionError: division by zero"
    assert obs.data is None and '"stdout": "before\\n"' in obs.content
    assert 'File \\"<code>\\", line 2' in obs.content  # the user's line, not the runner's
    assert "the code raised SyntaxError" in run(executor, "def (").error


def test_infinite_loop_is_stopped(executor):
    obs = run(executor, "while True:\n    pass", max_s=15)
    assert not obs.ok and obs.error.startswith("stopped:"), obs.error  # CPU limit (2 s) or wall limit (4 s)
    assert obs.elapsed_s >= 1.5


def test_sleeping_past_the_wall_clock_is_stopped(executor):
    obs = run(executor, "import time\ntime.sleep(60)", max_s=15)
    assert obs.error == "stopped: it ran past the wall-clock limit of 4 s"
    assert 3.5 < obs.elapsed_s < 15


def test_memory_bomb_hits_the_memory_limit(executor):
    obs = run(executor, "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", max_s=15)
    assert not obs.ok and obs.error == "the code raised MemoryError", obs.error


def test_output_flood_is_capped(executor):
    obs = run(executor, "while True:\n    print('x' * 1000)", max_s=15)
    assert not obs.ok and "File too large" in obs.error, obs.error  # RLIMIT_FSIZE on the stdout file
    assert "…[output cut: " in obs.content and len(obs.content) < 8000 + 100


@needs_namespaces
def test_fork_bomb_is_contained_and_leaves_no_process(executor):
    obs = run(executor, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", 15)
    assert not obs.ok and obs.error.startswith("stopped:"), obs.error
    time.sleep(0.5)
    left = subprocess.run(["ps", "-u", str(NOBODY), "-o", "pid=,stat="], capture_output=True, text=True).stdout
    assert [line for line in left.splitlines() if "Z" not in line.split()[-1]] == []  # nothing still running


@needs_namespaces
def test_writing_outside_its_directory_is_refused_and_tmp_is_private(executor, tmp_path):
    target = Path.cwd() / "sandbox-was-here.txt"
    obs = run(executor, f"open({str(target)!r}, 'w').write('x')")
    assert not obs.ok and "PermissionError" in obs.error and not target.exists()
    marker = f"vlchat-sandbox-test-{os.getpid()}"
    obs = run(executor, f"import os\nopen('/tmp/{marker}', 'w').write('x')\nos.getuid(), os.getcwd()")
    assert obs.ok and obs.data["result"] == f"({NOBODY}, '/tmp/work')"
    assert not Path("/tmp", marker).exists()  # its /tmp was a private tmpfs


@needs_namespaces
def test_network_is_unreachable_even_past_the_socket_shim(executor):
    shim = run(executor, "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)")
    assert shim.error == "the code raised PermissionError: network access is disabled in this sandbox"
    with socket.socket() as listener:  # a server on this machine's loopback the code must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # _socket is the C module under the shim: only the network namespace stops it.
        raw = run(executor, f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
    assert not raw.ok and "Network is unreachable" in raw.error, raw.error


def test_process_isolation_still_limits_time_and_blocks_sockets():
    config = SandboxConfig(wall_s=3, cpu_s=2, isolation="process")
    looped = run_python("while True:\n    pass", config)
    assert looped.error.startswith("stopped:") and looped.isolation == "process" and looped.elapsed_s < 10
    blocked = run_python("import socket\nsocket.socket()", config)
    assert "network access is disabled" in blocked.error
    assert run_python("import os\nos.path.basename(os.getcwd())", config).result == "'work'"


def test_the_environment_is_scrubbed(monkeypatch, executor):
    monkeypatch.setenv("VLCHAT_SECRET_TOKEN", "hunter2")
    obs = run(executor, "import os, sys\nsorted(os.environ), sys.flags.isolated")
    assert obs.ok and "VLCHAT_SECRET_TOKEN" not in obs.data["result"] and obs.data["result"].endswith(", 1)")


def test_code_size_is_limited(executor):
    obs = executor.run("python", {"code": "#" * 200_000})
    assert not obs.ok and obs.error == "code is 200000 characters, the limit is 100000"


@pytest.mark.skipif(not namespaces_available(), reason="only the namespaces give the code a private /tmp")
def test_an_interpreter_under_tmp_is_a_clear_error(tmp_path, monkeypatch):
    """A checkout under /tmp (seen: a `mktemp -d` clone): the code's private /tmp hides it."""
    (tmp_path / "python").symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    run = run_python("1 + 1")
    assert run.result is None
    assert run.error.startswith(f"the sandbox cannot start {tmp_path / 'python'}: it gives the code a private"), (
        run.error
    )

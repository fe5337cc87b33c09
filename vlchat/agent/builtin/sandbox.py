"""python: run model-written code in a separate, limited interpreter (one process per call).

Every call starts `python -I _sandbox_runner.py` (isolated mode: no PYTHON* variables, no user
site-packages, no script directory on sys.path) with:

- a scrubbed environment (PATH, HOME/TMPDIR = its work directory, UTF-8 locale, one BLAS thread);
- resource limits set by the runner before any user code runs: RLIMIT_CPU, RLIMIT_AS (memory),
  RLIMIT_FSIZE (every file written, its stdout and stderr files included), RLIMIT_NPROC,
  RLIMIT_NOFILE, no core files;
- a wall-clock limit, after which its whole process group is killed (SIGKILL);
- stdout/stderr written to files (bounded by RLIMIT_FSIZE) of which the first
  `max_output_chars` are returned; code on stdin, the result on a private file descriptor;
- a Python-level refusal of internet sockets and DNS look-ups (the runner's shim: a clear
  message, but ctypes or a subprocess gets round it -- it is not a security boundary).

When the parent runs as root and util-linux `unshare` + `setpriv` work (probed once), "namespaces"
isolation adds real boundaries: new network (loopback only, down), PID (the code sees only its
own processes; when it ends, the kernel kills every process it left) and mount namespaces;
private size-limited tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock, its work directory in
that /tmp (gone with the namespace); and the code runs as user `nobody` with no-new-privs, so it
cannot write anywhere else (everything else is root's) nor raise its limits, and RLIMIT_NPROC
binds (it does not bind root). It can still READ world-readable files (the venv, /etc) and use CPU
and memory up to its limits. Otherwise ("process" isolation) the code runs as the parent's user
in a fresh temporary directory (deleted afterwards) and can write wherever that user can, reach
the network via ctypes or a subprocess, and escape the process-group kill with setsid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from vlchat.agent.tools import Tool, ToolError

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
NOBODY = 65534
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the world-writable places, made private
# Run by `unshare` as root inside the new namespaces: private tmpfs mounts, a work directory owned
# by the sandbox user, then the code as that user. Not `exec`: sh stays PID 1 of the namespace, so
# the code is an ordinary process that the kernel's SIGXCPU reaches (PID 1 ignores it).
NAMESPACE_SCRIPT = """
set -e
size=$1; uid=$2; shift 2
mount -t tmpfs -o "size=$size,mode=1777,nosuid,nodev" tmpfs /tmp
for dir in /var/tmp /dev/shm /run/lock; do
  if [ -d "$dir" ]; then mount -t tmpfs -o "size=1m,mode=1777,nosuid,nodev" tmpfs "$dir"; fi
done
mkdir -m 700 /tmp/work && chown "$uid:$uid" /tmp/work && cd /tmp/work
set +e
setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"
exit $?
"""
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@dataclass(frozen=True)
class SandboxConfig:
    wall_s: float = 20.0  # wall-clock limit of one call
    cpu_s: int = 10  # CPU seconds per process
    memory_bytes: int = 1 << 30  # address space per process (numpy's import needs ~0.3 GiB)
    file_bytes: int = 8 << 20  # largest file it may write, stdout/stderr included
    max_processes: int = 32  # RLIMIT_NPROC (namespaces: counts the sandbox user's processes)
    max_open_files: int = 64
    max_output_chars: int = 4000  # of stdout and of stderr returned to the model
    max_result_chars: int = 4000  # of the last expression's repr and of a traceback
    max_code_chars: int = 100_000
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp (namespaces only)
    isolation: Literal["auto", "namespaces", "process"] = "auto"

    def __post_init__(self) -> None:
        if self.wall_s <= 0 or self.cpu_s < 1 or self.memory_bytes < 64 << 20 or self.max_processes < 1:
            raise ValueError(f"invalid sandbox limits {self}")


@dataclass(frozen=True)
class SandboxRun:
    stdout: str
    stderr: str
    result: str | None  # repr of the last expression's value, None when there is none
    error: str | None  # the traceback or the reason it was stopped, None on success
    exit_code: int
    elapsed_s: float
    isolation: str


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """True when we are root and unshare + setpriv create the namespaces (checked once, ~10 ms)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def run_python(code: str, config: SandboxConfig | None = None) -> SandboxRun:
    """Run `code` in a fresh sandboxed interpreter and wait for it (at most config.wall_s)."""
    config = config or SandboxConfig()
    if len(code) > config.max_code_chars:
        raise ToolError(f"code is {len(code)} characters, the limit is {config.max_code_chars}")
    use_namespaces = config.isolation == "namespaces" or (config.isolation == "auto" and namespaces_available())
    if config.isolation == "namespaces" and not namespaces_available():
        raise ToolError("namespace isolation needs root and util-linux unshare/setpriv, which are not available")
    host_dir = Path(tempfile.mkdtemp(prefix="vlchat-sandbox-"))
    try:
        return _run(code, config, host_dir, use_namespaces)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _run(code: str, config: SandboxConfig, host_dir: Path, use_namespaces: bool) -> SandboxRun:
    limits = {k: v for k, v in asdict(config).items() if k in _RUNNER_LIMITS}
    command = [sys.executable, "-I", str(RUNNER)]
    if use_namespaces:
        work = Path("/tmp/work")  # made by NAMESPACE_SCRIPT inside the private /tmp
        prefix = [*UNSHARE, "sh", "-c", NAMESPACE_SCRIPT, "sh", str(config.tmpfs_bytes), str(NOBODY)]
    else:
        work, prefix = _process_work_dir(host_dir, limits)
    with (
        open(host_dir / "stdout", "w+b") as out,
        open(host_dir / "stderr", "w+b") as err,
        open(host_dir / "result", "w+b") as result,
    ):
        start = time.monotonic()
        process = subprocess.Popen(
            [*prefix, *command, str(result.fileno()), json.dumps(limits)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            pass_fds=(result.fileno(),),
            cwd=None if use_namespaces else work,
            env=_clean_env(work),
            start_new_session=True,  # its own process group, killed as one
        )
        timed_out = _wait(process, code, config.wall_s)
        elapsed = time.monotonic() - start
        outcome = _read_json(result)
        stdout, stderr = _read_capped(out, config.max_output_chars), _read_capped(err, config.max_output_chars)
    error = outcome.get("error")
    status = process.returncode
    if timed_out:
        error = f"stopped: it ran past the wall-clock limit of {config.wall_s:g} s"
    elif not outcome:
        error = _cannot_start(status, stderr) or _death_reason(status, config, use_namespaces)
    isolation = "namespaces" if use_namespaces else "process"
    return SandboxRun(stdout, stderr, outcome.get("result"), error, status, elapsed, isolation)


def _process_work_dir(host_dir: Path, limits: dict[str, Any]) -> tuple[Path, list[str]]:
    """Process isolation: (a work directory in host_dir, the command prefix). As root, the code
    still runs as nobody (setpriv) so RLIMIT_NPROC binds; as another user, RLIMIT_NPROC counts
    all that user's processes, so the limit is raised by the number already running."""
    work = host_dir / "work"
    work.mkdir(mode=0o700)
    if os.geteuid() == 0 and shutil.which("setpriv"):
        host_dir.chmod(0o711)  # nobody may pass through to work/, not list host_dir
        os.chown(work, NOBODY, NOBODY)
        return work, ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--"]
    if os.geteuid() != 0:
        limits["max_processes"] += _count_processes(os.getuid())
    return work, []


def _count_processes(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:  # ended meanwhile
            continue
    return count


_RUNNER_LIMITS = ("cpu_s", "memory_bytes", "file_bytes", "max_processes", "max_open_files", "max_result_chars")


def _clean_env(work: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    # OpenBLAS needs these on some processors here (wrong results or crashes without); not secrets.
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _wait(process: subprocess.Popen, code: str, wall_s: float) -> bool:
    """Feed the code, wait; past the limit kill the process group. True when it timed out."""
    try:
        process.communicate(code.encode("utf-8", "surrogatepass"), timeout=wall_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(process.pid)  # also whatever it left running in its group
    process.wait()
    return timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_json(file: Any) -> dict[str, Any]:
    file.seek(0)
    try:
        data = json.loads(file.read(1 << 20).decode("utf-8", "replace"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_capped(file: Any, limit: int) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    text = file.read(limit * 4).decode("utf-8", "replace")[:limit]  # up to 4 bytes a character
    if size > len(text.encode("utf-8")):
        text += f"\n…[output cut: {size} bytes in all]"
    return text


def _cannot_start(status: int, stderr: str) -> str | None:
    """The set-up faults a user can meet: as root, the code runs as `nobody`, who must be able to
    enter every folder above the interpreter, and with namespaces /tmp (PRIVATE_DIRS) is a fresh
    mount that hides an interpreter installed there (setpriv exits 127: "failed to execute")."""
    if status != 127 or "failed to execute" not in stderr:
        return None
    hidden = next((d for d in PRIVATE_DIRS if sys.executable.startswith(d + "/")), None)
    if hidden is not None and "No such file" in stderr:
        return (
            f"the sandbox cannot start {sys.executable}: it gives the code a private, empty {hidden}, "
            f"which hides that interpreter; install vlchat's environment outside {hidden}"
        )
    return (
        f"the sandbox cannot start {sys.executable} as user nobody: a folder above it is closed to other "
        "users (e.g. mode 700); install vlchat's environment in a folder others may enter"
    )


def _death_reason(status: int, config: SandboxConfig, use_namespaces: bool) -> str:
    """Why the interpreter ended without a result; sh in the namespace reports a signal as 128+N."""
    number = -status if status < 0 else status - 128 if use_namespaces and status > 128 else 0
    if number == signal.SIGXCPU:
        return f"stopped: it used up its CPU-time limit of {config.cpu_s} s"
    if number == signal.SIGKILL:
        return "stopped: killed (SIGKILL: past its CPU-time hard limit, or out of memory)"
    if number:
        return f"stopped by signal {number}"
    return f"the interpreter exited with code {status} before reporting a result"


def python_tool(config: SandboxConfig | None = None) -> Tool:
    config = config or SandboxConfig()

    def python(code: str) -> dict[str, Any]:
        """Run Python 3 code in a sandbox: returns what it printed and its last expression's value.

        Args:
            code: the program, e.g. "print(2 ** 10)".
        """
        run = run_python(code, config)
        report = {"stdout": run.stdout, "result": run.result}
        if run.stderr:
            report["stderr"] = run.stderr
        if run.error:
            last_line = run.error.strip().splitlines()[-1]
            message = last_line if last_line.startswith("stopped") else f"the code raised {last_line}"
            raise ToolError(message, data={**report, "error": run.error})
        return report

    return Tool.from_function(python, timeout_s=config.wall_s + 10)

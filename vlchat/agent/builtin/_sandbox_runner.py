"""The first code the sandboxed interpreter runs (python -I this_file RESULT_FD LIMITS_JSON).

It reads the user's code from stdin, lowers its own resource limits (they hold for everything it
starts), replaces the socket constructor with one that refuses internet sockets, runs the code,
and writes {"result", "error"} as JSON to RESULT_FD. Convention: the value of the code's last
line, when that line is an expression (as in a notebook cell), is the result: `x = 2; x * 21`
gives "42". Printed output goes to stdout as usual. Standard library only: this file runs in a
fresh interpreter that imports nothing from vlchat.
"""

import ast
import json
import linecache
import os
import resource
import socket
import sys
import traceback

FILENAME = "<code>"


def apply_limits(limits: dict) -> None:
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL at hard
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)  # stdout/stderr files too
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class NoInternetSocket(socket.socket):
    """socket.socket that refuses IPv4/IPv6 (local AF_UNIX pairs still work)."""

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):  # noqa: A002 - socket's own names
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            raise PermissionError("network access is disabled in this sandbox")
        super().__init__(family, type, proto, fileno)


def no_lookup(*args, **kwargs):
    raise PermissionError("network access is disabled in this sandbox")


def block_network() -> None:
    socket.socket = NoInternetSocket
    socket.getaddrinfo = no_lookup
    socket.gethostbyname = no_lookup


def run(code: str, max_chars: int) -> dict:
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)  # source lines in tracebacks
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, FILENAME)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, FILENAME, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), FILENAME, "eval"), namespace) if last else None
    except SystemExit as exit:
        if exit.code in (None, 0):
            return {"result": None, "error": None}
        return {"result": None, "error": f"SystemExit: {exit.code}"}
    except BaseException as err:  # noqa: BLE001 - every failure of the user's code is reported
        namespace.clear()  # frees a memory bomb's objects before formatting
        frames = err.__traceback__.tb_next if err.__traceback__ else None  # drop this function's frame
        text = "".join(traceback.format_exception(type(err), err, frames))
        return {"result": None, "error": text[-max_chars:]}
    result = None if value is None else repr(value)
    return {"result": result if result is None or len(result) <= max_chars else result[:max_chars] + " …"}


def flush_streams(outcome: dict) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError as err:  # e.g. EFBIG: the file-size limit
            outcome["error"] = outcome.get("error") or f"OSError: {err}"


def main() -> None:
    result_fd, limits = int(sys.argv[1]), json.loads(sys.argv[2])
    runner_pid = os.getpid()
    code = sys.stdin.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code's stdin is empty
    apply_limits(limits)
    block_network()
    outcome = run(code, limits["max_result_chars"])
    if os.getpid() != runner_pid:  # a process the code forked got here: only the runner reports
        flush_streams({})
        os._exit(1 if outcome.get("error") else 0)
    outcome.setdefault("error", None)
    flush_streams(outcome)
    with os.fdopen(result_fd, "w", encoding="utf-8") as channel:
        json.dump(outcome, channel)


if __name__ == "__main__":
    main()

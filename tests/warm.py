"""Command-line processes for the tests that start without paying for their imports again.

`python -m show1.cli generate …` spends ~9 CPU-s importing torch, diffusers, transformers and mlflow before it does
anything, and the suite starts dozens of such processes. A server (one per test process, started on first use)
imports those libraries once; a command is then forked from it:

- `Popen`/`run` are `subprocess.Popen`/`subprocess.run` for `[sys.executable, "-m"|"-c", …]` commands;
- `commands_env(env)` puts a `show1` first on PATH for what a test runs through another program (`dvc repro`'s
  stages): a small client that has the server fork `show1` with the client's own stdio, directory and environment,
  passes SIGTERM/SIGINT/SIGHUP on, and exits as it did.

Each command still is a real process of its own: its own pid (signals and SIGKILL reach it), its own
stdin/stdout/stderr, environment, working directory and exit status (negative for a signal, as `subprocess` reports
it); it runs its module or code as `python -m`/`-c` does, atexit handlers included. The server forks only from its
one thread and never imports prefect (Prefect reads its settings from the environment when it is imported).

The server runs a command the ordinary way (a cold start) when forking could make a difference: an environment that
differs from the server's in a variable the preloaded libraries read at import time, or a `sys.path` that would
find another copy of show1 (a fresh clone's). SHOW1_TESTS_COLD=1 runs every command the ordinary way.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "show1.cli", "show1.pipelines.cascade", "show1.registry.resolve", "show1.registry.register",
           "show1.training.trainer", "mlflow.tracking")
# Read by the preloaded libraries when they are imported: a command that sets them differently starts cold.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_",
                   "MKL_", "KMP_", "PYTHON")
THREAD_COUNTS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # the exception: set per command with torch.set_num_threads
SOCKET_ENV = "SHOW1_WARM_SOCKET"  # where `commands_env`'s client finds the server
_STATUS = struct.Struct("!qq")  # (pid, raw wait status); pid 0: the server will not fork this command
COLD = 0


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items()
            if key.startswith(IMPORT_TIME_ENV) and key not in THREAD_COUNTS and key != "PYTHONPATH"}


# --------------------------------------------------------------------------------------------------- the server


def _command_path(request: dict[str, Any], base: list[str]) -> list[str]:
    """The command's sys.path: its first entry (`python -m`: the directory; `-c`: ''; a console script: its
    folder), then PYTHONPATH, then the interpreter's own."""
    extra = [entry for entry in request["env"].get("PYTHONPATH", "").split(os.pathsep) if entry]
    return [request["path0"], *extra, *base]


def _must_start_cold(request: dict[str, Any], defaults: dict[str, str], server_env: dict[str, str]) -> bool:
    if _import_time_env(defaults | request["env"]) != server_env:  # the command sets the same defaults
        return True
    for entry in _command_path(request, []):  # another copy of the project would be imported ('': the directory)
        for package in ("show1", "flows"):
            found = Path(request["cwd"], entry or ".", package)
            if found.is_dir() and found.resolve() != (ROOT / package).resolve():
                return True
    return False


def _run_command(request: dict[str, Any], base_path: list[str]) -> int:
    """In the forked child: become the command, run it, return its exit code."""
    argv, env = request["argv"], request["env"]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read from TMPDIR again, as a new process would
    sys.argv = [argv[2] if argv[1] == "-m" else "-c", *argv[3:]]  # runpy puts the module's file first
    sys.path[:] = _command_path(request, base_path)
    import torch

    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    import runpy

    try:
        if argv[1] == "-m":
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            import types

            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[2], "<string>", "exec"), main.__dict__)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    return code


def _finish(code: int) -> None:
    """The interpreter's shutdown, in order: non-daemon threads, atexit handlers, stdio; then exit."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code & 0xFF)


def _fork(request: dict[str, Any], fds: list[int], closing: list[Any], base_path: list[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for item in closing:
            item.close() if isinstance(item, socket.socket) else os.close(item)
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        code = _run_command(request, base_path)
    finally:
        _finish(code)
    return 0  # never reached


def serve(address: str) -> None:
    """Import PRELOAD, then fork one child per request until stdin closes (the test process is gone)."""
    from show1.config import apply_environment_defaults

    before = dict(os.environ)
    apply_environment_defaults()  # what every show1 command does before torch loads (OpenMP reads it then)
    defaults = {key: value for key, value in os.environ.items() if key not in before}
    server_env = _import_time_env(dict(os.environ))
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    assert "prefect" not in sys.modules, "a preloaded module imported prefect"
    assert threading.active_count() == 1, "a preloaded module started a thread: a fork would copy it broken"
    own = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))  # each command brings its own PYTHONPATH
    base_path = [entry for entry in sys.path[1:] if entry not in own]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, wake_read, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            return
        if wake_read in ready:
            os.read(wake_read, 4096)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                with contextlib.suppress(OSError):
                    children[pid].send(_STATUS.pack(pid, status))
                children.pop(pid).close()
        if listener in ready:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 22, 3)
            request = json.loads(message)
            if _must_start_cold(request, defaults, server_env):
                pid = COLD
            else:
                closing = [listener, wake_read, wake_write, connection, *children.values()]
                pid = _fork(request, fds, closing, base_path)
            for fd in fds:
                os.close(fd)
            connection.send(_STATUS.pack(pid, 0))
            if pid == COLD:
                connection.close()
            else:
                children[pid] = connection


# --------------------------------------------------------------------------------------------------- the client


class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.env: dict[str, str] = {}

    def start(self) -> None:
        folder = tempfile.mkdtemp(prefix="show1-warm-")
        self.address = os.path.join(folder, "socket")
        self.env = dict(os.environ)
        self.process = subprocess.Popen([sys.executable, __file__, self.address], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        atexit.register(self.stop)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # no deadline: on a busy machine the imports take what they take
        if line.strip() != "ready":
            raise RuntimeError(f"the warm Python server did not start (exit code {self.process.wait()})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)

    def socket_path(self) -> str:
        with self.lock:
            if self.process is None:
                self.start()
        return self.address


_SERVER = _Server()


def server_env() -> dict[str, str]:
    """The environment the server started with (it is started now if it was not): commands given this one, give or
    take variables read after import, are forked. A test that changes an import-time variable of the test process
    makes later commands that inherit it start cold (conftest sets the one show1's CLI sets, from the start)."""
    _SERVER.socket_path()
    return dict(_SERVER.env)


def _request(argv: list[str], cwd: str, path0: str, env: Mapping[str, str], new_session: bool) -> dict[str, Any]:
    """What the server is asked to fork: the command line, its directory, its sys.path[0] (`python -m`: the
    directory; `-c`: ''; a console script: its folder), its environment, and whether it leads a new session."""
    return {"argv": argv, "cwd": cwd, "path0": path0, "env": dict(env), "new_session": new_session}


def _spawn(address: str, request: dict[str, Any], fds: list[int]) -> tuple[socket.socket, int]:
    """Ask the server at `address` to fork `request` with `fds` as its stdin, stdout, stderr: (connection, pid);
    pid COLD when it will not (the caller starts the command the ordinary way)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(address)
    socket.send_fds(connection, [json.dumps(request).encode()], fds)
    reply = connection.recv(_STATUS.size)
    if len(reply) != _STATUS.size:
        connection.close()
        raise OSError(f"the warm Python server at {address} did not answer for {request['argv'][:3]}")
    pid = _STATUS.unpack(reply)[0]
    if pid == COLD:
        connection.close()
    return connection, pid


def _exit_status(connection: socket.socket, pid: int) -> int:
    """Block until the server reports the raw wait status of `pid`."""
    reply = connection.recv(_STATUS.size)
    connection.close()
    if len(reply) != _STATUS.size:  # the server is gone: the status is lost
        return 255 << 8
    return _STATUS.unpack(reply)[1]


_CHILD_PARAMETERS = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]  # type: ignore[attr-defined]


class Popen(subprocess.Popen):
    """`subprocess.Popen`, with `python -m/-c` commands forked from the warm server (module docstring)."""

    _warm: socket.socket | None = None

    def _execute_child(self, *arguments: Any) -> None:
        given = dict(zip(_CHILD_PARAMETERS, arguments, strict=True))
        args = given["args"]
        plain = (isinstance(args, (list, tuple)) and len(args) >= 3 and str(args[0]) == sys.executable
                 and args[1] in ("-m", "-c") and given["executable"] is None and given["preexec_fn"] is None
                 and not given["shell"] and not given["pass_fds"] and given.get("process_group", -1) in (-1, None)
                 and given["uid"] is None and given["gid"] is None and not given["gids"] and given["umask"] < 0)
        if not plain or os.environ.get("SHOW1_TESTS_COLD"):
            super()._execute_child(*arguments)
            return
        cwd = os.fspath(given["cwd"]) if given["cwd"] is not None else os.getcwd()
        request = _request([str(arg) for arg in args], cwd, cwd if args[1] == "-m" else "",
                           os.environ if given["env"] is None else given["env"], bool(given["start_new_session"]))
        fds = [given["p2cread"] if given["p2cread"] != -1 else 0, given["c2pwrite"] if given["c2pwrite"] != -1 else 1,
               given["errwrite"] if given["errwrite"] != -1 else 2]
        try:
            connection, pid = _spawn(_SERVER.socket_path(), request, fds)
        except (OSError, RuntimeError) as exc:  # no server: the command still runs, the ordinary way
            print(f"tests/warm.py: {exc}; starting {args[:3]} cold", file=sys.stderr)
            pid = COLD
        if pid == COLD:
            super()._execute_child(*arguments)
            return
        self.pid, self._warm, self._child_created = pid, connection, True
        self._close_pipe_fds(given["p2cread"], given["p2cwrite"], given["c2pread"], given["c2pwrite"],
                             given["errread"], given["errwrite"])

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        if self._warm is None:
            return super()._try_wait(wait_flags)
        if wait_flags & os.WNOHANG and not select.select([self._warm], [], [], 0)[0]:
            return 0, 0
        return self.pid, _exit_status(self._warm, self.pid)

    def _internal_poll(self, _deadstate: int | None = None, **_: Any) -> int | None:
        if self._warm is None:
            return super()._internal_poll(_deadstate)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None and self._warm.fileno() != -1:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def run(args: list[Any], *, input: str | bytes | None = None, capture_output: bool = False,
        timeout: float | None = None, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` with `Popen` above."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            process.kill()
            raise
        code = process.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, args, stdout, stderr)
    return subprocess.CompletedProcess(args, code, stdout, stderr)


# ------------------------------------------------------------------------------------- `show1` for other programs


def commands_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` with a `show1` (written into `folder`) first on PATH that runs as `command` below."""
    if os.environ.get("SHOW1_TESTS_COLD"):
        return env
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "show1"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" --command show1 "$@"\n')
    script.chmod(0o755)
    return env | {"PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}", SOCKET_ENV: _SERVER.socket_path()}


def command(name: str, args: list[str]) -> int:
    """Run the venv's console script `name` (show1) as this process, forked from the server at SHOW1_WARM_SOCKET;
    exec the real script when the server is not there or will not fork it."""
    real = str(Path(sys.executable).parent / name)
    request = _request([sys.executable, "-m", "show1.cli", *args], os.getcwd(), str(Path(sys.executable).parent),
                       os.environ, new_session=False)
    try:
        connection, pid = _spawn(os.environ[SOCKET_ENV], request, [0, 1, 2])
    except (KeyError, OSError):
        pid = COLD
    if pid == COLD:
        os.execv(real, [real, *args])
    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(forwarded, lambda number, _: os.kill(pid, number))
    status = _exit_status(connection, pid)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    if sys.argv[1] == "--command":
        sys.exit(command(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[1])

"""Run untrusted model-written Python in a contained subprocess (HumanEval's checks).

inspect_evals runs HumanEval completions in a Docker sandbox (`sandbox().exec` with a timeout).
Machines without Docker get this local container instead, built from what the OS and CPython
offer without privileges:

- a separate `python -I` process (isolated mode: no user site, no PYTHON* variables) in a fresh
  temporary working directory that is deleted afterwards, with an empty environment;
- its own session, killed as a whole group on timeout (wall clock) - a loop that never ends or
  a child it forked cannot outlive the check;
- resource limits: CPU seconds, address space, file size, open files, no core dumps;
- a CPython audit hook, installed before the program runs, that refuses writes outside the
  working directory (open for writing, remove, rename, mkdir, chmod, ...), starting programs
  (subprocess, os.system, exec, fork, spawn), network sockets, ctypes and os.kill (audit hooks
  cannot be removed once added).

The audit hook is a containment measure for code that misbehaves by accident or clumsily, as
OpenAI's human-eval `reliability_guard` is; it is not a boundary against an adversary that
targets CPython. Use Docker (inspect_evals' own humaneval) for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

DEFAULT_TIMEOUT = 10.0
MEMORY_BYTES = 1 << 30  # address space; numpy-free test code needs far less
MAX_FILE_BYTES = 1 << 20
MAX_OUTPUT = 4000  # characters of stdout/stderr kept

# Runs inside the child before the program: the audit hook, then the program from stdin.
_BOOT = textwrap.dedent(
    """
    import os, resource, sys

    def _limit(cpu_seconds, memory, file_size):
        # Set here, in the child, rather than by a preexec_fn: the parent (JAX) is threaded,
        # and running Python between fork and exec there can deadlock.
        for which, value in ((resource.RLIMIT_CPU, cpu_seconds),
                             (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, file_size),
                             (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))

    _limit(*(int(a) for a in sys.argv[1:4]))
    del _limit

    def _install():
        # State lives in this closure, not in module globals the program could reset.
        root = os.path.realpath(os.getcwd())
        armed = [False]
        deny = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "os.fork", "os.forkpty", "os.kill", "os.killpg", "socket.connect",
                "socket.bind", "socket.__new__", "ctypes.dlopen", "ctypes.dlsym",
                "ctypes.cdata", "pty.spawn", "os.putenv", "os.unsetenv",
                "shutil.rmtree", "os.chdir", "os.chroot"}
        path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod",
                       "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime"}
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def inside(path):
            if isinstance(path, int):
                return True  # a file descriptor: opened under these rules
            try:
                full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
            except Exception:
                return False
            return full == root or full.startswith(root + os.sep)

        def hook(event, args):
            if not armed[0]:
                return
            if event in deny:
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open":
                path, mode, flags = args
                writing = (mode is not None and any(c in mode for c in "wax+")) or bool(
                    flags & write_flags)
                if writing and not inside(path):
                    raise PermissionError(f"sandbox: writing {path!r} is not allowed")
            elif event in path_events:
                for a in args[:2]:
                    if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                        raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")

        sys.addaudithook(hook)
        return armed

    _armed = _install()
    _code = compile(sys.stdin.read(), "<completion>", "exec")
    _armed[0] = True
    del _install, _armed
    exec(_code, {"__name__": "__main__"})
    """
)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How a contained program ended."""

    returncode: int | None  # None when it was killed for the timeout
    timed_out: bool
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_contained(source: str, timeout: float = DEFAULT_TIMEOUT) -> RunResult:
    """Run Python `source` contained (see the module docstring); never raises for what the
    program does."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="mup-sandbox-") as work:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOT]
            + [str(max(1, int(timeout) + 1)), str(MEMORY_BYTES), str(MAX_FILE_BYTES)],
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        try:
            out, err = proc.communicate(source, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return RunResult(
            returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            stdout=out[-MAX_OUTPUT:],
            stderr=err[-MAX_OUTPUT:],
        )

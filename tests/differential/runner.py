"""Runs a list of examples, each as a fresh program: ``python3 runner.py SPEC.json RESULT.json``.

A fork server, because interpreter start-up dominates: ``import mlflow`` alone is ~2 s, and the
suite runs ~90 examples twice. This process imports the heavy modules once (numpy, pandas,
matplotlib, sklearn, and ``mlflow`` or ``tracklane.mlflow``, whichever face the spec names) and
then forks a child per example (``parallel`` at a time: most of an example's time is spent
waiting on the server). The child is the example's process: its own working directory,
environment, stdout/stderr files, random generators seeded alike in both variants, and an exit
done as the interpreter does it (an uncaught exception goes through ``sys.excepthook`` and sets
``sys.last_value``, then non-daemon threads are joined and the atexit handlers run, which is when
MLflow and tracklane end the runs left active). Nothing is shared between examples but the
already-imported modules, so no example can see another's active run, experiment or settings.

Standard library only: it must not import what it runs before the spec says which face.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any


def _preimport(modules: list[str]) -> None:
    for name in modules:
        with contextlib.suppress(Exception):  # an example that needs it reports the ImportError itself
            importlib.import_module(name)


def _child(example: dict[str, Any]) -> int:
    os.chdir(example["cwd"])
    os.environ.update(example["env"])
    for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
        target = os.open(os.path.join(example["cwd"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import random

    random.seed(0)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(0)
    sys.argv = [f"{example['id']}.py"]
    namespace = {"__name__": "__main__", "__file__": os.path.join(example["cwd"], "example.py")}
    code = 0
    try:
        exec(compile(example["source"], f"<{example['id']}>", "exec"), namespace)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        # What the interpreter does with an uncaught exception, in its order.
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
        try:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except Exception:
            traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter joins these first
    except Exception:
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _start(example: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(example)
        finally:
            os._exit(code)
    return pid


def main(spec_path: str, result_path: str) -> None:
    """Run the spec's examples, ``parallel`` children at a time; each is killed at its timeout."""
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.update(spec["env"])
    _preimport(spec["preimport"])
    pending = list(reversed(spec["examples"]))
    running: dict[int, tuple[dict[str, Any], float]] = {}
    results: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            example = pending.pop()
            running[_start(example)] = (example, time.monotonic())
        for pid, (example, started) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            timed_out = not done and time.monotonic() - started > example["timeout"]
            if timed_out:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
            if done or timed_out:
                del running[pid]
                results[example["id"]] = {
                    "id": example["id"],
                    "returncode": os.waitstatus_to_exitcode(status),
                    "timed_out": timed_out,
                    "seconds": time.monotonic() - started,
                }
        time.sleep(0.02)
    with open(result_path, "w") as f:
        json.dump([results[e["id"]] for e in spec["examples"]], f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

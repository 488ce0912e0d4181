"""Run the ``mtlkit`` command line, an example or a script module inside the test process.

A fresh interpreter costs 4-7 s on CI's two cores (importing torch, then torch._dynamo when the
first optimizer is built), which was most of the time of most command-line tests and brought the
suite near CI's 15 minutes. In the test process the command goes through the same ``main()`` and
argument parsing; what only a separate process shows (the console entry point, ``python -m
mtlkit.cli``, serving without mtlkit, torchrun, an interruption) is still tested in one.

Both return a :class:`subprocess.CompletedProcess`, as ``subprocess.run(..., text=True)`` does: exit
code 2 for errors ``main()`` reports, 1 with the traceback on stderr for any other exception.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what the interpreter does with ``sys.exit("message")``
    return 1


def _run(target: Callable[[], object], argv: list[str], cwd: str | os.PathLike | None, columns: int | None
         ) -> subprocess.CompletedProcess:
    from mtlkit.cli import console

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, list(sys.path), set(sys.modules), torch.get_num_threads(), console.width, os.getcwd()
    code = 0
    try:
        os.chdir(cwd or os.getcwd())  # contextlib.chdir needs Python 3.11; mtlkit supports 3.10
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = argv
            if columns:
                console.width = columns
            try:
                target()
            except SystemExit as exit:
                code = _exit_code(exit.code)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        for name in set(sys.modules) - saved[2]:
            # An example's sibling module (examples/label_scale.py) is imported afresh next time.
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent == ROOT / "examples":
                del sys.modules[name]
        torch.set_num_threads(saved[3])
        console.width = saved[4]
        os.chdir(saved[5])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd: str | os.PathLike | None = None, columns: int | None = None) -> subprocess.CompletedProcess:
    """``mtlkit ARGS`` through the console entry point's ``main()``; ``columns`` widens the console
    (as the ``COLUMNS`` variable would) so that long messages are not wrapped."""
    from mtlkit.cli import main

    return _run(main, ["mtlkit", *map(str, args)], cwd, columns)


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python examples/SCRIPT ARGS`` from the repository root, its folder first on the import path
    as for a script."""
    path = ROOT / "examples" / script

    def target() -> None:
        sys.path.insert(0, str(path.parent))
        runpy.run_path(str(path), run_name="__main__")

    return _run(target, [str(path), *map(str, args)], ROOT, None)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root (for scripts that change no process-wide
    setting; those that do, such as the benchmark suite's measurements, run in processes of their own)."""
    def target() -> None:
        # Run afresh as __main__ even where a test imported it (runpy warns of that copy otherwise).
        imported = sys.modules.pop(module, None)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            if imported is not None:
                sys.modules[module] = imported

    return _run(target, [module, *map(str, args)], ROOT, None)

"""A host build of ``csrc/``: the CUDA kernels' own source, compiled by the C++ compiler against
the stand-in headers in ``include/`` (see ``include/cuda_runtime.h`` for the execution model),
with the real ``csrc/bindings.cpp``. The module it makes has the extension's interface and runs
the kernels on CPU memory, so ``spot_kernels.cuda`` runs on CPU tensors with it (its ``HOST``
attribute is True) and the CUDA backend's tests run without a GPU.

``build()`` rewrites each ``k<<<grid, block, shmem, stream>>>(args)`` launch into
``::emu::launch(k, ::emu::Config{grid, block, shmem, stream}, args)``, compiles everything into
one shared library under ``build/cuda-host-<hash of the sources>/`` (about 15 s on 2 cores,
once; reused until a source changes) and imports it. ``selftest()`` checks the emulation itself.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
LAUNCH = re.compile(r"^(\s*)([A-Za-z_][\w:]*(?:<[^\n;]*?>)?)<<<(.*?)>>>\(", re.M)


def rewrite_launches(source: str) -> str:
    """``source`` with every kernel launch written as a call of ``emu::launch``."""
    out = LAUNCH.sub(r"\1::emu::launch(\2, ::emu::Config{\3}, ", source)
    if "<<<" in out:
        raise ValueError("a kernel launch the rewrite does not understand (one launch per line, "
                         "starting the statement)")
    return out


def why_not():
    """Why the host build cannot be made here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed"
    return None


def _sources():
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def _key():
    h = hashlib.sha256()
    for p in _sources() + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")) + sorted(
            (HERE / "include").glob("*.h")) + [HERE / "selftest.cu", Path(__file__)]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all", "-static-libubsan"]


def _compile(sources, target, *, shared, extra=()):
    """Each source (``.cu`` launches rewritten) compiled to an object in parallel, then linked
    into ``target`` (written atomically, from a work folder of this process's own: builds in
    concurrent processes, such as ``pytest -n``'s workers, never see each other's files)."""
    import pybind11

    cxx = os.environ.get("CXX", "g++")
    work = target.parent / f"src.{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++20", "-O2", "-g0", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
             f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}", *extra]
    if shared:
        flags.append("-fvisibility=hidden")
    jobs, objects = [], []
    for p in sources:
        src = work / (p.stem + ".cpp")
        src.write_text(rewrite_launches(p.read_text()) if p.suffix == ".cu" else p.read_text())
        obj = src.with_suffix(".o")
        cmd = [cxx, *flags, "-c", str(src), "-o", str(obj)]
        jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
        objects.append(str(obj))
    link = [cxx, *(["-shared"] if shared else []), *extra, *objects, "-o",
            str(target.with_suffix(f".{os.getpid()}.tmp"))]
    for cmd, proc in jobs + [(link, None)]:
        if proc is None:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        log = proc.communicate()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"host build failed:\n{' '.join(cmd)}\n{log[-8000:]}")
    os.replace(link[-1], target)
    shutil.rmtree(work, ignore_errors=True)


def _out(out_root):
    return Path(out_root or ROOT / "build") / f"cuda-host-{_key()}"


def build(out_root: Path | None = None, ubsan: bool = False):
    """The host module (built on first use, then cached by a hash of the sources). ``ubsan``:
    a separate build under the undefined-behaviour sanitizer (signed overflow, misaligned or
    out-of-range accesses of the kernels' own arrays abort the process: run it in a subprocess,
    as ``bounds.py`` is)."""
    out = _out(out_root) / ("ubsan" if ubsan else "")
    lib = out / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not lib.exists():
        _compile(_sources(), lib, shared=True, extra=UBSAN if ubsan else ())
    spec = importlib.util.spec_from_file_location("_cuda", lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.HOST = True
    return mod


def selftest(out_root: Path | None = None):
    """Builds and runs ``selftest.cu``: ``{check: (cuda error name, value)}``."""
    exe = _out(out_root) / "selftest"
    if not exe.exists():
        _compile([HERE / "selftest.cu"], exe, shared=False)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: (err, float(v)) for name, err, v in (ln.split() for ln in lines.splitlines())}

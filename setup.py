"""Build script: pure Python, plus the CUDA extension ``spot_kernels._cuda`` when ``nvcc`` is found.

The extension is torch-free (kernels in ``csrc/*.cu``, bindings in ``csrc/bindings.cpp``) and is
compiled and linked by ``nvcc`` alone (static CUDA runtime, no torch, no ATen), so it builds
in the isolated build environment that only holds setuptools and pybind11.

Environment:
* ``CUDA_HOME``: where to look for ``bin/nvcc`` first; then ``nvcc`` on ``PATH``.
* ``SPOT_CUDA_ARCHS``: compute capabilities, default ``"80;86;89;90"`` (A100, A10/3090, L4/4090,
  H100/H200). Each gets SASS; the highest also gets PTX for newer GPUs. A single value such as
  ``90`` compiles about four times faster.
* ``SPOT_KERNELS_BUILD_CUDA``: ``0`` skips the extension, ``1`` makes a missing ``nvcc`` or a
  failed build an error. Unset: a missing ``nvcc`` or a failed build installs pure Python (the
  ``torch`` and ``triton`` backends) and says so in one line.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CU_SOURCES = sorted(os.path.join(CSRC, f) for f in os.listdir(os.path.join(ROOT, CSRC))
                    if f.endswith(".cu")) if os.path.isdir(os.path.join(ROOT, CSRC)) else []
CPP_SOURCES = [os.path.join(CSRC, "bindings.cpp")]
DEFAULT_ARCHS = "80;86;89;90"


def say(msg):
    print(f"spot-kernels: {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    """``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on ``PATH``; None when neither exists."""
    home = os.environ.get("CUDA_HOME")
    if home:
        cand = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def arch_list(spec=None):
    """``"80;86;89;90"`` (``;``, ``,`` or spaces) -> ``["80", "86", "89", "90"]``. A compute
    capability is two or three digits (``90``, ``100``, ``8.6``, ``sm_120``), optionally with
    ``a`` (architecture-specific code: runs on exactly that GPU) or ``f`` (family-specific)."""
    spec = os.environ.get("SPOT_CUDA_ARCHS", DEFAULT_ARCHS) if spec is None else spec
    archs = [a.strip().replace(".", "").removeprefix("sm_")
             for a in spec.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs or not all(re.fullmatch(r"[1-9][0-9]{1,2}[af]?", a) for a in archs):
        raise ValueError(f"SPOT_CUDA_ARCHS must list compute capabilities like '80;90', got {spec!r}")
    return archs


def arch_number(arch):
    """``"90a"`` -> 90, ``"120"`` -> 120."""
    return int(arch.rstrip("af"))


def gencode_flags(archs):
    """SASS for every arch, plus portable PTX (no ``a``/``f`` suffix) for the highest one, which
    the driver compiles for any later GPU."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(arch_number(a) for a in archs)
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--threads", "0"]
# Built modules are kept under build/ (git-ignored), keyed by everything that goes into them, so
# the repeated `pip install -e .` of `make test` does not recompile unchanged kernels.
CACHE = os.path.join(ROOT, "build", "spot_kernels_cuda")


def build_key(nvcc, archs):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(ROOT, CSRC))):
        with open(os.path.join(ROOT, CSRC, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    import pybind11

    for part in (version, ";".join(archs), " ".join(NVCC_FLAGS), sys.version, pybind11.__version__):
        digest.update(part.encode() + b"\0")
    with open(os.path.abspath(__file__), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()[:16]


class BuildExt(build_ext):
    """Compiles ``spot_kernels._cuda`` with nvcc; falls back to pure Python unless told not to."""

    def run(self):
        strict = os.environ.get("SPOT_KERNELS_BUILD_CUDA", "").strip() == "1"
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no extension"
            if strict:
                raise
            say(f"building the CUDA extension failed ({exc}); installing pure Python without "
                f"the 'cuda' backend (set SPOT_KERNELS_BUILD_CUDA=1 to make this an error)")
            # nor a module an earlier build left in build/ (or in place), which a wheel
            # would ship for architectures not asked for this time
            for ext in self.extensions:
                stale = self.get_ext_fullpath(ext.name)  # build/lib..., or in place (-e)
                if os.path.exists(stale):
                    os.remove(stale)
            self.extensions = []
            self.distribution.ext_modules = []

    def build_extension(self, ext):
        import pybind11  # a build requirement (pyproject.toml)

        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (CUDA_HOME/bin, PATH)")
        archs = arch_list()
        tmp = os.path.join(self.build_temp, "spot_kernels_cuda")
        os.makedirs(tmp, exist_ok=True)
        includes = ["-I" + os.path.join(ROOT, CSRC), "-I" + pybind11.get_include(),
                    "-I" + sysconfig.get_paths()["include"]]

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, *NVCC_FLAGS, *includes, "-c", os.path.join(ROOT, src), "-o", obj]
            if src.endswith(".cu"):
                cmd[1:1] = gencode_flags(archs)
            else:  # the bindings report what was compiled
                cmd[1:1] = [f'-DSPOT_CUDA_ARCHS="{";".join(archs)}"']
            self.announce(" ".join(cmd), level=2)
            subprocess.run(cmd, check=True)
            return obj

        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        cached = os.path.join(CACHE, build_key(nvcc, archs), os.path.basename(out))
        if os.path.isfile(cached):  # same sources, flags, archs and nvcc: reuse
            shutil.copy2(cached, out)
            say(f"reused the CUDA extension built earlier ({os.path.relpath(cached, ROOT)})")
            return
        jobs = max(1, min(len(ext.sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        # nvcc links the static CUDA runtime by default: the module needs only the driver.
        subprocess.run([nvcc, "-shared", "--cudart", "static", *objects, "-o", out], check=True)
        say(f"built the CUDA extension for sm_{', sm_'.join(archs)} with {nvcc}")
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            shutil.copy2(out, cached)
        except OSError:
            pass  # a read-only tree: no cache, no harm


def ext_modules():
    mode = os.environ.get("SPOT_KERNELS_BUILD_CUDA", "").strip()
    if mode == "0":
        say("SPOT_KERNELS_BUILD_CUDA=0: skipping the CUDA extension (pure Python install)")
        return []
    if mode not in ("", "1"):
        raise SystemExit(f"SPOT_KERNELS_BUILD_CUDA must be 0 or 1, got {mode!r}")
    if not CU_SOURCES:
        if mode == "1":
            raise SystemExit(f"SPOT_KERNELS_BUILD_CUDA=1 but the CUDA sources are missing "
                             f"({CSRC} has no .cu files)")
        say(f"no CUDA sources in {CSRC}: installing pure Python without the 'cuda' backend")
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise SystemExit("SPOT_KERNELS_BUILD_CUDA=1 but nvcc was found neither in "
                             "$CUDA_HOME/bin nor on PATH")
        say("nvcc not found (CUDA_HOME, PATH): installing pure Python without the 'cuda' backend")
        return []
    arch_list()  # a malformed SPOT_CUDA_ARCHS fails here, with its name
    return [Extension("spot_kernels._cuda", sources=CU_SOURCES + CPP_SOURCES,
                      depends=[os.path.join(CSRC, "common.cuh"),
                               os.path.join(CSRC, "spot_kernels.h")])]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})

"""The CUDA extension's build, on a machine with ``nvcc`` and no GPU (CI).

* The extension builds (``setup.py``, one arch), imports, links neither torch nor a shared CUDA
  runtime, reports launch errors as exceptions, and the ``cuda`` backend says it is unavailable
  on CPU (and a forced ``backend="cuda"`` on CPU tensors raises a clear error).
* Every kernel compiles for sm_90 without register spills (``-Xptxas -v``).
* Without ``nvcc``, ``setup.py`` installs pure Python with one clear line, and
  ``SPOT_KERNELS_BUILD_CUDA=1`` turns that into an error.

Tests that need ``nvcc`` skip with a reason when it is absent.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spot_kernels as sk
from spot_kernels import cuda

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def find_nvcc():
    """Like setup.py: ``$CUDA_HOME/bin/nvcc``, then ``PATH``."""
    home = os.environ.get("CUDA_HOME")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH)")


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """The installed ``spot_kernels._cuda``, or one built now into a temporary folder."""
    try:
        return importlib.import_module("spot_kernels._cuda")
    except ImportError:
        pass
    if NVCC is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH) and no installed spot_kernels._cuda")
    out = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, SPOT_CUDA_ARCHS="90", SPOT_KERNELS_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(out / "lib"),
                           "-t", str(out / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"setup.py build_ext failed:\n{proc.stderr[-4000:]}"
    [so] = list((out / "lib" / "spot_kernels").glob("_cuda*.so"))
    spec = importlib.util.spec_from_file_location("spot_kernels._cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def loaded(extension, monkeypatch):
    """Make ``spot_kernels.cuda`` use ``extension`` (whether installed or built here)."""
    monkeypatch.setitem(sys.modules, "spot_kernels._cuda", extension)
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_ext_error", None)
    return extension


def test_extension_imports_and_is_torch_free(loaded):
    for name in ("lse_forward", "backward_epilogue", "segment_sum", "bce_forward", "versions"):
        assert callable(getattr(loaded, name)), name
    driver, runtime = loaded.versions()
    assert runtime >= 11000, f"runtime version {runtime}"
    assert loaded.ARCHS and all(a[:2].isdigit() for a in loaded.ARCHS.split(";"))
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", loaded.__file__], capture_output=True, text=True).stdout
        for lib in ("libtorch", "libc10", "libcudart.so"):
            assert lib not in deps, f"{loaded.__file__} links {lib}:\n{deps}"


def test_launch_errors_raise(loaded):
    # rows < 0 is refused before any launch: the error path works without a GPU.
    with pytest.raises(RuntimeError, match="lse_forward: cudaErrorInvalidValue"):
        loaded.lse_forward(2, 0, -1, 8, 8, 0, 0, 0.0, 1.0, -100, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="backward_epilogue: cudaErrorInvalidValue"):
        loaded.backward_epilogue(7, 0, 1, 8, 8, 0, 0, 0, 0, 0, 0, 0.0, 1.0, -100, 0)


def test_cuda_backend_not_available_on_cpu(loaded):
    assert cuda._load() is loaded
    assert "cuda" not in sk.available_backends("cpu")
    ok, why = cuda.available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    h = torch.randn(5, 8)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
        sk.token_logprobs(h, w, t, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors; hidden is on cpu"):
        cuda.forward(h, w, t)
    if not torch.cuda.is_available():
        ok, why = cuda.available(torch.device("cuda"))
        assert not ok and why


def test_an_extension_from_older_sources_is_refused(loaded, monkeypatch):
    """The raw-pointer bindings cannot check buffer types: a module built before a launcher's
    pointer types changed (lse float32 -> float64) would misread them silently, so its ABI
    number must match (an editable install not rebuilt after a pull)."""
    assert loaded.ABI == cuda.ABI
    monkeypatch.setattr(loaded, "ABI", cuda.ABI - 1)
    ok, why = cuda.available(torch.device("cuda"))
    assert not ok and "built from other sources" in why and "pip install -e ." in why
    with pytest.raises(RuntimeError, match="built from other sources"):
        cuda._extension()


def test_missing_extension_is_a_reason_not_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spot_kernels._cuda", None)  # import raises ImportError
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_ext_error", None)
    ok, why = cuda.available(torch.device("cuda"))
    assert not ok and "spot_kernels._cuda is not built" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        sk.token_logprobs(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long),
                          backend="cuda")


SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_90'")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_no_register_spills_sm90(source, tmp_path):
    proc = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-c",
                           str(CSRC / source), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entry, spills, kernels = None, [], 0
    for line in proc.stderr.splitlines():
        if m := ENTRY.search(line):
            entry = m.group(1)
            kernels += 1
        elif (m := SPILL.search(line)) and entry is not None:
            if any(int(x) for x in m.groups()):  # spills, or arrays in local memory
                spills.append(f"{entry}: {line.strip()}")
    assert kernels > 0, f"no kernels compiled from {source}:\n{proc.stderr[-2000:]}"
    assert not spills, "register spills or a stack frame:\n" + "\n".join(spills)


def _setup_module(monkeypatch):
    """setup.py's functions, without running its ``setup()``."""
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("SPOT_KERNELS_BUILD_CUDA", "0")
    spec = importlib.util.spec_from_file_location("spot_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arch_specs_and_what_runs_where(monkeypatch):
    """Three-digit compute capabilities (Blackwell's 100, 120) and ``a``/``f`` suffixes parse;
    the portable PTX is the highest plain number; a module runs on a GPU only where its SASS or
    PTX can."""
    setup = _setup_module(monkeypatch)
    assert setup.arch_list("100; 12.0,sm_86 90a 103f") == ["100", "120", "86", "90a", "103f"]
    for bad in ("9", "1000", "90b", "", "sm_", "090"):
        with pytest.raises(ValueError, match="SPOT_CUDA_ARCHS"):
            setup.arch_list(bad)
    flags = setup.gencode_flags(["90a", "100f", "80"])
    assert flags[-2:] == ["-gencode", "arch=compute_100,code=compute_100"]
    assert "arch=compute_90a,code=sm_90a" in flags and "arch=compute_100f,code=sm_100f" in flags
    ok = cuda._arch_ok
    assert ok("80;86;89;90", 9, 0) and ok("80;86;89;90", 12, 0)  # SASS; PTX 90 for newer GPUs
    assert ok("80", 8, 6) and not ok("86;89", 8, 0) and not ok("89", 8, 6)
    assert not ok("100", 9, 0) and ok("100", 10, 3) and ok("120", 12, 1)
    assert ok("90a", 9, 0) and ok("90a", 10, 0)  # the portable PTX (compute_90) runs on 10.0
    assert ok("100a", 10, 0) and not ok("100a;120a", 10, 3)  # 100a: exactly 10.0; PTX 120
    assert ok("100f", 10, 3) and not ok("100f", 9, 0)


@needs_nvcc
def test_nvcc_takes_the_gencode_flags(monkeypatch, tmp_path):
    """The flags for a Blackwell and an ``a`` arch compile (one small source)."""
    setup = _setup_module(monkeypatch)
    flags = setup.gencode_flags(setup.arch_list("90a;100"))
    proc = subprocess.run([NVCC, "-std=c++17", *flags, "-c", str(CSRC / "segment_sum.cu"),
                           "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _setup_env(**extra):
    """An environment in which nvcc cannot be found."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "SPOT_KERNELS_BUILD_CUDA")}
    env["PATH"] = os.path.dirname(sys.executable)
    env.update(extra)
    return env


@pytest.mark.skipif(shutil.which("nvcc", path=os.path.dirname(sys.executable)) is not None,
                    reason="nvcc sits beside python: cannot hide it")
def test_setup_without_nvcc(tmp_path):
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path), "-t",
           str(tmp_path / "t")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_setup_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nvcc not found (CUDA_HOME, PATH): installing pure Python" in proc.stderr
    assert not list(tmp_path.rglob("_cuda*.so"))
    proc = subprocess.run(cmd, cwd=ROOT, env=_setup_env(SPOT_KERNELS_BUILD_CUDA="1"),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "SPOT_KERNELS_BUILD_CUDA=1 but nvcc was found" in proc.stderr
    proc = subprocess.run(cmd, cwd=ROOT, env=_setup_env(SPOT_KERNELS_BUILD_CUDA="0"),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "skipping the CUDA extension" in proc.stderr

"""The oldest supported transformers is the one ``make test`` runs the transformers tests on.

``make test`` runs the suite on the newest transformers, then the tests that touch transformers
again with the release pinned as ``TRANSFORMERS_OLDEST`` in the Makefile first on the path
(``SPOT_TRANSFORMERS_OLDEST`` set). These tests keep that pin, the package's declared floor and
the run itself in step.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _makefile_pin():
    m = re.search(r"^TRANSFORMERS_OLDEST\s*:=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile pins no TRANSFORMERS_OLDEST"
    return m.group(1)


def test_declared_floor_is_the_release_make_test_runs():
    floors = re.findall(r'"transformers>=([^";,\s]+)', (ROOT / "pyproject.toml").read_text())
    assert floors, "pyproject.toml declares no transformers floor"
    assert set(floors) == {_makefile_pin()}, (
        f"pyproject.toml's floors {sorted(set(floors))} differ from the Makefile's "
        f"TRANSFORMERS_OLDEST {_makefile_pin()}: the floor users are promised is not the one tested")


def test_floor_run_imports_the_floor(tmp_path):
    """In this process, and in a child started elsewhere (torchrun's workers, the CLI tests'
    subprocesses) with the environment it inherits."""
    want = os.environ.get("SPOT_TRANSFORMERS_OLDEST")
    if not want:
        pytest.skip("not the floor run (make test sets SPOT_TRANSFORMERS_OLDEST for it)")
    import transformers
    assert want == _makefile_pin()
    assert transformers.__version__ == want, (
        f"the floor run imported transformers {transformers.__version__} from "
        f"{transformers.__file__}, not {want}")
    child = subprocess.run([sys.executable, "-c", "import transformers as t; print(t.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == want, f"a subprocess imported transformers {child.stdout}"

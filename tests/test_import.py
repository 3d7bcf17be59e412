"""``import spot_kernels`` stays light: no CUDA, no Triton, no dynamo, no compiled extension."""
import subprocess
import sys


def test_import_touches_nothing_heavy():
    code = ("import sys, spot_kernels\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers') "
            "or m.startswith(('torch._dynamo', 'torch._inductor', 'spot_kernels._cuda', "
            "'spot_kernels.triton', 'spot_kernels.cuda'))]\n"
            "import torch\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

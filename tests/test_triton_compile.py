"""Compile the Triton kernels for Hopper (sm_90) and Ampere (sm_80) without a GPU.

The CPU tests run the kernels through Triton's interpreter, which accepts code the real
compiler rejects (and ignores layouts, shared memory and registers). This test compiles every
kernel with every launch configuration of ``configs.py`` (the Hopper table and the default for
other devices, half and float32 inputs; the backward kernels with and without the ``hi + lo``
split, for bfloat16 and for float16, whose dA tiles are scaled first) to cubin in a subprocess (the interpreter setting is fixed when the kernels are first
imported), as two kinds of sizes specialise it: ragged ones (any N and V, a model's D and row
strides, multiples of 16, which turns on software pipelining: a packed batch; the real heads,
where N and V are multiples of 16 too, have spilled no more than these) and odd ones (none a
multiple of 16: no pipelining). Each must fit the device's shared memory and, at ragged sizes,
where Triton ships ``cuobjdump``, keep its stack frame within 64 bytes a thread: a kernel that
spills more than a few registers to local memory fails. At odd sizes (test shapes, never a
real head) spills are printed: slower, still correct. On sm_90 at ragged sizes the default
backward's ``dh`` and ``dW`` atomic adds must be 4-wide vector reductions (read from the PTX),
and every half-precision kernel must multiply on the tensor cores (``wgmma`` on sm_90,
``mma.sync`` on sm_80, read from the PTX).

The kernels promise Triton >= 3.3. ``make test`` installs two more releases apart (``pip install
--target`` folders): the oldest supported (``SPOT_TRITON_OLDEST``) and the GPU machine's
(``SPOT_TRITON_GPU``, 3.6), and every kernel is compiled with each too. The launch table is
tuned for Triton >= 3.6, so the stack limit holds there (the newest release alone missed a
spill that only 3.6 showed); older releases must compile every entry within shared memory, and
their spills are printed, not failed (3.3 spills about 400-480 bytes in the deterministic
``dW`` pass at odd sizes: slower, still correct).
"""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os, re, shutil, subprocess, tempfile, warnings
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spot_kernels.triton import bwd, bwd_da, bwd_dh, bwd_dw, configs, fwd, merge

    # the launches say whether to fuse multiply-adds (Triton 3.9 warns when that is left unset)
    warnings.filterwarnings("error", message=".*TRITON_DEFAULT_FP_FUSION")
    FLOATS = {"inv_temp", "softcap", "filter_eps"}
    POINTERS = {"H", "W", "B", "T", "LOGP", "LSE", "Q", "ENT", "PM", "PS", "PT", "PQ", "G", "DH",
                "DW", "DB", "DA"}
    SMEM = {90: 227 * 1024, 80: 163 * 1024}
    STACK_LIMIT = 64  # bytes a thread: a few spilled values (Triton versions differ by that)
    TUNED = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)
    print("triton", triton.__version__, "from", os.path.dirname(triton.__file__), flush=True)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    CUOBJDUMP = (os.path.join(tools, "cuobjdump") if os.path.exists(os.path.join(tools, "cuobjdump"))
                 else shutil.which("cuobjdump"))

    # what a launch specialises on: pointers are 16-byte aligned, and ints that are multiples
    # of 16 are known to be (D and the row strides turn on software pipelining). "real": all of
    # them (the benchmark heads); "ragged": any token count and vocabulary (a packed batch, a
    # vocabulary shard, the last block of da_bytes) with a model's D; "odd": none of them
    INTS16 = {"N", "V", "D", "stride_hn", "stride_wv", "stride_an", "cols_per_split", "group_m"}
    SIZES = os.environ["SIZES"]
    INTS16 = {"real": INTS16, "odd": set(),
              "ragged": INTS16 - {"N", "V", "cols_per_split", "stride_an"}}[SIZES]

    def build(kernel, consts, cfg, dtype, arch):
        ptr = {"H": dtype, "W": dtype, "B": dtype, "DA": dtype, "T": "*i64", "LSE": "*fp64"}
        consts = dict(consts, **{n: 1 for n in ("stride_hd", "stride_wd") if n in kernel.arg_names})
        sig = {n: "constexpr" if n in consts else ptr.get(n, "*fp32") if n in POINTERS else
               "fp32" if n in FLOATS else "i32" for n in kernel.arg_names}
        idx = {n: i for i, n in enumerate(kernel.arg_names)}
        attrs = {(idx[n],): [["tt.divisibility", 16]] for n in kernel.arg_names
                 if sig[n].startswith("*") or n in INTS16}
        src = ASTSource(fn=kernel, signature=sig,
                        constexprs={(idx[n],): v for n, v in consts.items()}, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options=configs.launch_options(cfg))
        stack = None
        if CUOBJDUMP:
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(out.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
            os.unlink(f.name)
            stack = int(re.search(r"STACK:(\\d+)", usage).group(1))
        return out.metadata.shared, stack, out.asm["ptx"]

    def atomics(ptx):
        """``{width: count}`` of the float32 atomic adds in ``ptx`` (1: scalar, 4: ``.v4``)."""
        widths = [int(w or 1) for w in
                  re.findall(r"\\b(?:red|atom)\\.global[\\w.]*?\\.add\\.(?:v(\\d)\\.)?f32\\b", ptx)]
        return {w: widths.count(w) for w in sorted(set(widths))}

    def blocks(c):
        return dict(BLOCK_M=c["block_m"], BLOCK_V=c["block_v"], BLOCK_D=c["block_d"])

    def jobs():
        """(name, kernel, constexprs, config, pointer dtype, arch) of every entry."""
        seen = set()
        tables = [(90, kernel, kind, dict(zip(configs.FIELDS, c)))
                  for (kernel, kind, _), c in configs._HOPPER.items()]
        tables += [(80, kernel, kind, cfg) for (kernel, kind), cfg in configs._DEFAULT.items()]
        for arch, kernel, kind, cfg in tables:
            key = (arch, kernel, kind, tuple(sorted(cfg.items())))
            if key in seen:
                continue
            seen.add(key)
            dtype = "*bf16" if kind == "half" else "*fp32"
            prec = "tf32" if kind == "half" else "ieee"
            full = dict(HAS_BIAS=True, HAS_SOFTCAP=True, PRECISION=prec, **blocks(cfg))
            plain = dict(full, HAS_BIAS=False, HAS_SOFTCAP=False)
            tag = f"sm_{arch} {kind} {kernel} {tuple(cfg.values())}"
            if kernel == "forward":
                yield tag + " forward", fwd._forward_kernel, dict(full, ENTROPY=True, SPLIT=True), cfg, dtype, arch
                yield tag + " forward plain", fwd._forward_kernel, dict(plain, ENTROPY=False, SPLIT=False), cfg, dtype, arch
                # the da_bytes backward's dA blocks take the forward's config
                yield tag + " backward_da", bwd_da._backward_da_kernel, full, cfg, dtype, arch
                yield tag + " backward_da plain", bwd_da._backward_da_kernel, plain, cfg, dtype, arch
                continue
            # float16 (its own code: each dA tile scaled by a power of two) beside bfloat16,
            # without the split (the default; with it, all 3 releases compiled and kept the
            # stack limit too, at twice the time)
            for split, dt in (((False, dtype), (True, dtype), (False, "*fp16"))
                              if kind == "half" else ((False, dtype),)):
                s = f" split={split}" + (" fp16" if dt == "*fp16" else "")
                yield tag + " backward" + s, bwd._backward_kernel, dict(full, NEED_H=True, NEED_W=True, NEED_B=True, FILTER=True, SPLIT=split), cfg, dt, arch
                yield tag + " backward_dh" + s, bwd_dh._backward_dh_kernel, dict(full, FILTER=True, SPLIT=split), cfg, dt, arch
                yield tag + " backward_dw" + s, bwd_dw._backward_dw_kernel, dict(full, NEED_W=True, NEED_B=True, FILTER=True, SPLIT=split), cfg, dt, arch
            yield tag + " backward plain", bwd._backward_kernel, dict(plain, NEED_H=True, NEED_W=True, NEED_B=False, FILTER=False, SPLIT=False), cfg, dtype, arch
        yield "merge", merge._merge_kernel, dict(ENTROPY=True, BLOCK=128), dict(num_warps=4, num_stages=1), "*bf16", 90

    bad = []
    for name, kernel, consts, cfg, dtype, arch in jobs():
        name = f"{name} sizes={SIZES}"
        smem, stack, ptx = build(kernel, consts, cfg, dtype, arch)
        print(name, "shared", smem, "stack", stack, flush=True)
        if kernel is bwd._backward_kernel and arch == 90 and SIZES != "odd":
            # Hopper's 4-wide float32 reductions (red.global.add.v4.f32): the dh and dW adds
            # are the default backward's bottleneck, a quarter of the instructions this way;
            # only db's one add a column stays scalar. Needs D and the row strides known to be
            # multiples of 16 (odd sizes go scalar)
            got = atomics(ptx)
            if not got.get(4) or got.get(1, 0) > int(consts["NEED_B"]):
                bad.append(f"{name}: float32 atomic adds by width {got}, want 4-wide for dh and dW")
        if dtype in ("*bf16", "*fp16") and kernel is not merge._merge_kernel:
            # half inputs must reach the tensor cores: Hopper's asynchronous warpgroup MMA
            # (wgmma), Ampere's mma.sync; a tl.dot lowered to FMAs would be many times slower
            mma = "wgmma.mma_async" if arch == 90 else "mma.sync"
            if mma not in ptx:
                bad.append(f"{name}: no {mma} in the PTX")
        if smem > SMEM[arch]:
            bad.append(f"{name}: {smem} bytes of shared memory")
        if stack and stack > STACK_LIMIT and TUNED and SIZES != "odd":
            bad.append(f"{name}: {stack} bytes of stack (register spills)")
    print("cuobjdump:", CUOBJDUMP or "not found: spills not checked")
    assert not bad, bad
    print("OK")
''')


APART = {"oldest": "SPOT_TRITON_OLDEST", "gpu": "SPOT_TRITON_GPU"}  # which -> its folder's variable


def _apart(which):
    """The folder of a Triton release installed apart (``make install``), or skip."""
    var = APART[which]
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set (make test installs the {which} Triton there)")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "triton", "__init__.py")):
        pytest.skip(f"no Triton installed under {var}={path}")
    # its compiled core fits one Python only: name a mismatch instead of an ImportError
    tags = [line.split(":", 1)[1].strip() for wheel in glob.glob(os.path.join(
        path, "triton-*.dist-info", "WHEEL")) for line in open(wheel) if line.startswith("Tag:")]
    mine = "cp{}{}".format(*sys.version_info[:2])
    assert not tags or any(t.startswith(mine + "-") for t in tags), (
        f"{var}={path} holds Triton for {tags[0].split('-')[0]}, not {mine}: "
        "install it for this Python (make test keeps one folder per Python)")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["installed", "oldest", "gpu"])
def test_every_config_compiles_for_hopper_and_ampere_without_spills(which):
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [_apart(which)] if which in APART else []
    env["PYTHONPATH"] = os.pathsep.join(path + [root, env.get("PYTHONPATH", "")])
    # two size specialisations (SCRIPT), in processes side by side: "real" (the benchmark
    # heads) pipelines as "ragged" does and has spilled no more than it in every entry and
    # candidate compiled so far, so "ragged" stands for both (run SCRIPT with SIZES=real to see)
    kinds = ("odd", "ragged")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], env=dict(env, SIZES=sizes),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sizes in kinds]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode and ("ptxas" in err and "not found" in err.lower()):
            pytest.skip("no ptxas for the CUDA backend of triton on this machine")
        assert proc.returncode == 0 and out.strip().endswith("OK"), out[-3000:] + err[-3000:]
        if which in APART:  # that release compiled, not the installed one
            assert out.startswith("triton") and path[0] in out.splitlines()[0], out[:300]

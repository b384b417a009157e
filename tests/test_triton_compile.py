"""Every kernel variant fastaccum.backends.triton_kernels (and triton_fold, the batched fold)
launches compiles for real GPUs (sm_80, sm_90) without a GPU, with 128-bit vector loads on the
flat streams and no spills.

The variant list comes from ``triton_kernels.specializations()`` and
``triton_fold.specializations()``, the same functions the launchers use. Pointer arguments
get ``tt.divisibility=16``, as Triton's launcher gives any 16-byte aligned tensor (the flat
buffers and their 16-element-aligned views are; the batched fold's sources are checked to be).
Spills: the cubin Triton assembled must use no local memory and no stack (``cuobjdump
-res-usage``, shipped with Triton), and the PTX must have no ``.local`` space.

The compilation runs in one subprocess per session (this file run as a script): the test
session has ``TRITON_INTERPRET=1`` (tests/conftest.py, no GPU here), under which Triton's own
library functions (``tl.sum``, ``tl.randint4x``) are interpreted objects that cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ARCHS = (80, 90)
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# ------------------------------------------------------------------ the compiling subprocess
def _name(spec):
    fn = getattr(spec.kernel, "fn", spec.kernel)
    flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in spec.constexprs.items() if k != "BLOCK")
    ptrs = ",".join(sorted({v for v in spec.pointers.values() if v not in ("*i64", "*fp32")}))
    return f"{fn.__name__}[{flags}{';' + ptrs if ptrs else ''}]"


def _signature(spec):
    fn = spec.kernel
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = spec.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            ann = fn.params[i].annotation_type
            if not ann:
                raise TypeError(f"{name} of {_name(spec)} needs a type annotation (a fixed launch signature)")
            sig[name] = ann
    return sig, attrs


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _compile_all(out_path):
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, ROOT)
    from fastaccum.backends import triton_fold as F
    from fastaccum.backends import triton_kernels as K

    def build(spec, arch, extra_attrs=()):
        sig, attrs = _signature(spec)
        for name in extra_attrs:
            attrs[(spec.kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(fn=spec.kernel, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": K.NUM_WARPS})

    def resources(cubin, tmp):
        """cuobjdump's resource usage of the cubin Triton assembled: registers, stack, local memory."""
        tool = _cuobjdump()
        if tool is None:
            return None
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        r = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
        return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()))) if m else {"error": r.stdout + r.stderr}

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = list(K.specializations()) + list(F.specializations())
        for spec in specs:
            for arch in ARCHS:
                compiled = build(spec, arch)
                ptx = compiled.asm["ptx"]
                results.append(dict(name=_name(spec), kernel=spec.kernel.fn.__name__, arch=arch,
                                    constexprs={k: str(v) for k, v in spec.constexprs.items()},
                                    loads=re.findall(r"ld\.global[.\w]*", ptx),
                                    stores=re.findall(r"st\.global[.\w]*", ptx), local=".local" in ptx,
                                    res=resources(compiled.asm["cubin"], tmp)))
        # accumulate_ on a length that is a multiple of 16 (Triton specialises that): vectorised
        ptx = build(K._accumulate_spec(torch.bfloat16, False), 90, extra_attrs=("n",)).asm["ptx"]
        extra = dict(accumulate_n16_loads=re.findall(r"ld\.global[.\w]*", ptx), n_specs=len(specs),
                     names=[_name(s) for s in specs], block=K.BLOCK, num_warps=K.NUM_WARPS)
    with open(out_path, "w") as fh:
        json.dump({"results": results, **extra}, fh)


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("compile") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, HERE, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_variant_list_covers_every_launcher(compiled):
    kernels = {r["kernel"] for r in compiled["results"]}
    assert kernels == {"_sumsq_kernel", "_finalize_kernel", "_adam_kernel", "_sgd_kernel", "_accumulate_kernel",
                       "_fold_kernel"}
    fold = {r["name"] for r in compiled["results"] if r["kernel"] == "_fold_kernel"}
    assert len(fold) == 4, f"bf16/fp16 sources, with and without the sums of squares: {sorted(fold)}"
    assert len(compiled["names"]) == len(set(compiled["names"])) == compiled["n_specs"], "duplicate variants"


def test_every_variant_compiles_vectorised_without_spills(compiled):
    problems = []
    for r in compiled["results"]:
        where = f"{r['name']} sm_{r['arch']}"
        if r["local"]:
            problems.append(f"{where}: local memory in PTX")
        n_v4 = sum(".v4" in ld for ld in r["loads"])
        if r["kernel"] == "_adam_kernel":
            c = r["constexprs"]
            streams = 3 + (c["AMSGRAD"] == "True") + (c["HAS_MASTER"] == "True")  # grad, m, v, [vmax], [master]
            if n_v4 < streams:
                problems.append(f"{where}: {n_v4} vector loads for {streams} flat streams")
        elif r["kernel"] in ("_sumsq_kernel", "_sgd_kernel") and n_v4 == 0:
            problems.append(f"{where}: no vector loads of the flat gradient: {sorted(set(r['loads']))}")
        elif r["kernel"] == "_fold_kernel":
            # a full tile streams its 16-bit source and its fp32 segment in 128-bit accesses:
            # per thread BLOCK / threads elements, 8 source or 4 fp32 elements per access
            per_thread = compiled["block"] // (32 * compiled["num_warps"])
            src_v4, dst_v4 = per_thread // 8, per_thread // 4
            stores_v4 = sum(".v4" in st for st in r["stores"])
            if n_v4 < src_v4 + dst_v4 or stores_v4 < dst_v4:
                problems.append(f"{where}: {n_v4} vector loads / {stores_v4} vector stores, expected at least "
                                f"{src_v4 + dst_v4} / {dst_v4} (source + segment)")
        res = r["res"]
        if res is not None and (res.get("local") != 0 or res.get("stack") != 0):
            problems.append(f"{where}: spills to local memory / stack: {res}")
    assert not problems, "\n".join(problems)


def test_accumulate_vectorises_when_n_is_a_multiple_of_16(compiled):
    assert any(".v4" in ld for ld in compiled["accumulate_n16_loads"]), compiled["accumulate_n16_loads"]


if __name__ == "__main__":
    _compile_all(sys.argv[1])

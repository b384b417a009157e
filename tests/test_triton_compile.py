"""Every kernel variant fastaccum.backends.triton_kernels (and triton_fold, the batched fold)
launches compiles for real GPUs (sm_80, sm_90) without a GPU, with 128-bit vector loads on the
flat streams and no spills.

The variant list comes from ``triton_kernels.specializations()`` and
``triton_fold.specializations()``, the same functions the launchers use. Pointer arguments
get ``tt.divisibility=16``, as Triton's launcher gives any 16-byte aligned tensor (the flat
buffers and their 16-element-aligned views are; the batched fold's sources are checked to be).
Spills: the cubin Triton assembled must use no local memory and no stack (``cuobjdump
-res-usage``, shipped with Triton; and ptxas's own report of stack frame and spill bytes, which
Triton prints with ``TRITON_DUMP_PTXAS_LOG=1``), and the PTX must have no ``.local`` space.
``python tests/test_triton_compile.py --report`` prints registers, stack and spills per variant.

Signs of zero: no kernel may negate a float (Triton up to 3.6 lowers ``-x`` to ``0.0 - x``,
+0.0 for x = -0.0; see triton_kernels' docstring): checked in the kernels' source and, for every
variant, in the PTX (no subtraction from a +0.0 operand).

The compilation runs in one subprocess per session (this file run as a script): the test
session has ``TRITON_INTERPRET=1`` (tests/conftest.py, no GPU here), under which Triton's own
library functions (``tl.sum``, ``tl.randint4x``) are interpreted objects that cannot be compiled.
"""
import ast
import contextlib
import io
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


def _ptxas_report(log):
    """Registers, stack frame and spill bytes from ptxas's ``-v`` output (Triton prints it when
    ``TRITON_DUMP_PTXAS_LOG`` is set, on a fresh compile); None when there is none."""
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m is None:
        return None
    r = re.search(r"Used (\d+) registers", log)
    return dict(stack_frame=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]), reg=int(r[1]) if r else None)


def _subtractions_from_zero(ptx):
    """PTX float subtractions whose first operand is +0.0 (a literal, or a register moved from
    one): how ``-x`` comes out of Triton up to 3.6, and it turns -0.0 into +0.0."""
    zeros = set(re.findall(r"mov\.[bf](?:32|64)\s+(%\w+),\s*0[fd]0+;", ptx))
    bad = []
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@%\w+\s+)?sub(?:\.r[nzmp])?(?:\.ftz)?\.f(?:32|64)\s+%\w+,\s*([%\w]+),", line)
        if m and (m[1] in zeros or re.fullmatch(r"0[fd]0+", m[1])):
            bad.append(line.strip())
    return bad


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
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas's -v report, printed by Triton (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": K.NUM_WARPS})
        return compiled, _ptxas_report(log.getvalue())

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
                compiled, ptxas = build(spec, arch)
                ptx = compiled.asm["ptx"]
                results.append(dict(name=_name(spec), kernel=spec.kernel.fn.__name__, arch=arch,
                                    constexprs={k: str(v) for k, v in spec.constexprs.items()},
                                    loads=re.findall(r"ld\.global[.\w]*", ptx),
                                    stores=re.findall(r"st\.global[.\w]*", ptx), local=".local" in ptx,
                                    res=resources(compiled.asm["cubin"], tmp), ptxas=ptxas,
                                    zero_minus=_subtractions_from_zero(ptx)))
        # accumulate_ on a length that is a multiple of 16 (Triton specialises that): vectorised
        ptx = build(K._accumulate_spec(torch.bfloat16, False), 90, extra_attrs=("n",))[0].asm["ptx"]
        extra = dict(accumulate_n16_loads=re.findall(r"ld\.global[.\w]*", ptx), n_specs=len(specs),
                     names=[_name(s) for s in specs], triton=triton.__version__, block=K.BLOCK,
                     num_warps=K.NUM_WARPS)
    with open(out_path, "w") as fh:
        json.dump({"results": results, **extra}, fh)


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("compile") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # a fresh compile of every variant, so that ptxas runs and its report is printed
    env.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
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
            problems.append(f"{where}: spills to local memory / stack (cuobjdump): {res}")
        rep = r["ptxas"]
        if rep is not None and (rep["stack_frame"] or rep["spill_stores"] or rep["spill_loads"]):
            problems.append(f"{where}: ptxas reports a stack frame or spills: {rep}")
    assert not problems, f"triton {compiled['triton']}:\n" + "\n".join(problems)


def test_accumulate_vectorises_when_n_is_a_multiple_of_16(compiled):
    assert any(".v4" in ld for ld in compiled["accumulate_n16_loads"]), compiled["accumulate_n16_loads"]


def test_resource_reports_are_read(compiled):
    """The spill checks above read something: every variant has cuobjdump's report (when this
    Triton ships cuobjdump) and ptxas's (when this Triton prints it)."""
    results = compiled["results"]
    if _cuobjdump() is not None:
        assert all(r["res"] and "reg" in r["res"] for r in results), results[0]
    if any(r["ptxas"] for r in results):
        assert all(r["ptxas"] and r["ptxas"]["reg"] for r in results), results[0]
    assert _cuobjdump() is not None or any(r["ptxas"] for r in results), "no resource report: nothing was checked"


# ------------------------------------------------------------------ signs of zero
_KERNEL_SOURCES = ("fastaccum/backends/triton_kernels.py", "fastaccum/backends/triton_backend.py",
                   "fastaccum/backends/triton_fold.py")


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if isinstance(target, ast.Attribute) and target.attr == "jit":
                    yield node


def _float_negations(source):
    """``-x`` of a non-literal inside @triton.jit functions: (function, line)."""
    out = []
    for fn in _jit_functions(ast.parse(source)):
        for node in ast.walk(fn):
            if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                    and not isinstance(node.operand, ast.Constant)):
                out.append((fn.name, node.lineno))
    return out


def test_negation_lint_catches_a_unary_minus():
    bad = "@triton.jit\ndef k(x):\n    y = -65536\n    return x + (-x) * y\n"
    assert _float_negations(bad) == [("k", 4)]
    assert _float_negations("@triton.jit\ndef k(x):\n    return x * -1.0 - 0x7FFF\n") == []


def test_kernels_never_negate_a_value():
    """Unary minus lowers to ``0.0 - x`` under Triton <= 3.6: -0.0 becomes +0.0 on the GPU
    (where the interpreter keeps -0.0). Write ``a - b * c`` or ``x * -1.0`` instead."""
    found = {}
    for rel in _KERNEL_SOURCES:
        with open(os.path.join(ROOT, rel)) as fh:
            hits = _float_negations(fh.read())
        if hits:
            found[rel] = hits
    assert not found, found


def test_subtraction_from_zero_detector():
    old = "mov.b32 \t%r296, 0f00000000;\n\tsub.f32 \t%r297, %r296, %r3;\n\tsub.f32 %r9, %r8, %r3;\n"
    assert _subtractions_from_zero(old) == ["sub.f32 \t%r297, %r296, %r3;"]
    assert _subtractions_from_zero("\tsub.rn.f64 %rd3, 0d0000000000000000, %rd2;") != []
    assert _subtractions_from_zero("\tneg.f32 %r297, %r3;\n\tfma.rn.f32 %r1, %r297, %r2, %r4;") == []


def test_no_variant_subtracts_from_zero(compiled):
    """Every variant's PTX, the bf16 rounding stores' inputs included: no ``0.0 - x`` (with the
    old ``p + (-step_size) * q`` Triton 3.6 emitted ``sub.f32 %r, 0f00000000, %step_size``, and a
    -0.0 bf16 parameter came out +0.0 on an H100)."""
    bad = {f"{r['name']} sm_{r['arch']}": r["zero_minus"][:3] for r in compiled["results"] if r["zero_minus"]}
    assert not bad, f"triton {compiled['triton']}: {bad}"


def _print_report(path):
    data = json.loads(open(path).read())
    print(f"triton {data['triton']}")
    print(f"{'variant':100s} arch  reg stack spill(st/ld) local")
    for r in data["results"]:
        res, rep = r["res"] or {}, r["ptxas"] or {}
        reg, stack = res.get("reg", rep.get("reg", "?")), res.get("stack", rep.get("stack_frame", "?"))
        spills = f"{rep.get('spill_stores', '?')}/{rep.get('spill_loads', '?')}"
        print(f"{r['name']:100s} sm_{r['arch']} {reg:>4} {stack:>5} {spills:>11} {res.get('local', '?')}")


if __name__ == "__main__":
    if sys.argv[1] == "--report":  # compile every variant and print what each uses
        os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        os.environ.pop("TRITON_INTERPRET", None)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            _compile_all(os.path.join(d, "compiled.json"))
            _print_report(os.path.join(d, "compiled.json"))
    else:
        _compile_all(sys.argv[1])

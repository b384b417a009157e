"""The import rules of ARCHITECTURE.md, checked by parsing the package's source.

Imports only go down (tools -> public API -> optimizer -> algorithms/window/buffers ->
backends -> reference), and a few concerns have exactly one home. Each rule is a function
of (module name, parsed source) that returns its violations, so every rule is also run on
a small source that breaks it: a rule that cannot fail would pass silently.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable, Dict, List

import pytest

import fastaccum

PACKAGE = Path(fastaccum.__file__).parent

# the core modules that algorithms, window and buffers are
ALGORITHMS = {"fastaccum.adam", "fastaccum.sgd"}
ABOVE_BACKENDS = {"fastaccum.optimizer", "fastaccum.window", "fastaccum.buffers", *ALGORITHMS}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> Dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, tree: ast.Module) -> List[str]:
    """Absolute names of every module (or module attribute) ``module`` imports."""
    is_pkg = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out += [f"{prefix}.{a.name}" for a in node.names]
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# ------------------------------------------------------------------------------- rules
def rule_tools_only_from_tools(module: str, tree: ast.Module) -> List[str]:
    """Nothing outside tools/ imports tools/ (``python -m fastaccum``, the entry point, sits above them)."""
    if _under(module, "fastaccum.tools") or module == "fastaccum.__main__":
        return []
    return [f"{module} imports {n}" for n in imported(module, tree) if _under(n, "fastaccum.tools")]


def rule_tools_use_public_names(module: str, tree: ast.Module) -> List[str]:
    """tools/ uses only fastaccum's public names; plan never imports the bench harness."""
    if not _under(module, "fastaccum.tools"):
        return []
    bad = []
    for n in imported(module, tree):
        if not _under(n, "fastaccum") or _under(n, "fastaccum.tools"):
            if module.endswith(".plan") and _under(n, "fastaccum.tools") and n.split(".")[2] in ("bench", "benchmark"):
                bad.append(f"{module} (plan) imports the bench harness {n}")
            continue
        rest = n[len("fastaccum."):] if n != "fastaccum" else ""
        if rest and rest not in fastaccum.__all__:
            bad.append(f"{module} imports the non-public {n}")
    return bad


def rule_backends_below_optimizer(module: str, tree: ast.Module) -> List[str]:
    """backends/** never imports the optimizer, the algorithms, the window or the buffers."""
    if not _under(module, "fastaccum.backends"):
        return []
    return [f"{module} imports {n}" for n in imported(module, tree)
            if any(_under(n, m) for m in ABOVE_BACKENDS) or n in {f"fastaccum.{m.split('.')[-1]}" for m in ABOVE_BACKENDS}
            or _under(n, "fastaccum.tools")]


def rule_only_cpu_backend_touches_C(module: str, tree: ast.Module) -> List[str]:
    """Only backends/cpu/ imports the compiled extension."""
    if _under(module, "fastaccum.backends.cpu"):
        return []
    return [f"{module} imports {n}" for n in imported(module, tree) if n.split(".")[-1] == "_C"]


GRAD_ATTRS = {"grad", "main_grad"}
FLAG_ATTRS = {"live", "fresh", "garbage"}


def _assigned_attrs(tree: ast.Module):
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            while isinstance(t, ast.Subscript):  # bucket.live[i] = ... writes the flag too
                t = t.value
            if isinstance(t, ast.Attribute):
                yield node.lineno, t.attr


def rule_only_buffers_write_grads_and_flags(module: str, tree: ast.Module) -> List[str]:
    """Only buffers.py writes p.grad, p.main_grad or bucket flags (the tools are users, not the core)."""
    if module == "fastaccum.buffers" or _under(module, "fastaccum.tools"):
        return []
    return [f"{module}:{line} writes .{attr}" for line, attr in _assigned_attrs(tree)
            if attr in GRAD_ATTRS | FLAG_ATTRS]


MULTIPLIER_INPUTS = {"weight_sum", "divisor", "clip_coef", "scale_and_divisor"}


# The device-resident step computes the same formula in the finalize kernel; only window.py
# launches it (checked below), so the formula still has one owner on the Python side.
DEVICE_FORMULA = "fastaccum.backends.triton_kernels"


def rule_only_window_computes_multiplier(module: str, tree: ast.Module) -> List[str]:
    """Only window.py computes the update multiplier: elsewhere grad_multiplier= gets a
    computed value never, the window's inputs (weight sum, divisor, clip coefficient) take
    part in no arithmetic, and nothing but window.py launches the device finalize."""
    if module == "fastaccum.window" or _under(module, "fastaccum.tools"):
        return []
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "finalize"
                and getattr(node.func.value, "id", None) != "weakref" and module != DEVICE_FORMULA):
            bad.append(f"{module}:{node.lineno} launches finalize")
    if module == DEVICE_FORMULA:
        return bad
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "grad_multiplier" and isinstance(node.value, ast.BinOp):
            bad.append(f"{module}:{node.value.lineno} computes grad_multiplier")
        if isinstance(node, ast.BinOp):
            for side in (node.left, node.right):
                name = side.attr if isinstance(side, ast.Attribute) else getattr(side, "id", None)
                if name in MULTIPLIER_INPUTS:
                    bad.append(f"{module}:{node.lineno} does arithmetic with {name}")
    return bad


RULES: List[Callable[[str, ast.Module], List[str]]] = [
    rule_tools_only_from_tools,
    rule_tools_use_public_names,
    rule_backends_below_optimizer,
    rule_only_cpu_backend_touches_C,
    rule_only_buffers_write_grads_and_flags,
    rule_only_window_computes_multiplier,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_package_keeps_rule(rule):
    violations = [v for module, tree in sources().items() for v in rule(module, tree)]
    assert not violations, f"{rule.__doc__}\n" + "\n".join(violations)


# Each rule on a module that breaks it: the checker must report it.
BREAKERS = {
    rule_tools_only_from_tools: ("fastaccum.optimizer", "from .tools import cli"),
    rule_tools_use_public_names: ("fastaccum.tools.cli", "from ..buffers import Bucket"),
    rule_backends_below_optimizer: ("fastaccum.backends.torch_backend", "from ..window import AccumulationWindow"),
    rule_only_cpu_backend_touches_C: ("fastaccum.backends.torch_backend", "from .cpu import _C"),
    rule_only_buffers_write_grads_and_flags: ("fastaccum.optimizer", "bucket.live[i] = False\np.grad = None"),
    rule_only_window_computes_multiplier: ("fastaccum.optimizer", "hp = AdamHyper(grad_multiplier=1.0 / (s * d))\n"
                                           "kernels.finalize(partials, state, steps, index)"),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule_reports_a_violation(rule):
    module, code = BREAKERS[rule]
    assert rule(module, ast.parse(code)), f"{rule.__name__} missed: {code!r} in {module}"


def test_plan_importing_the_bench_harness_is_reported():
    assert rule_tools_use_public_names("fastaccum.tools.plan", ast.parse("from .bench import Runner"))
    assert rule_tools_use_public_names("fastaccum.tools.plan", ast.parse("from .benchmark import Runner"))
    assert not rule_tools_use_public_names("fastaccum.tools.plan", ast.parse("from .units import parse_memory"))

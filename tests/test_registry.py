"""The backend registry: auto choice, environment override, fallback, and a new backend
plugged in without touching the optimizer."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastaccum
from fastaccum import backends
from fastaccum.backends.torch_backend import TorchBackend

_C_BUILT = "cpu" in fastaccum.available_backends("cpu")


class CountingBackend(TorchBackend):
    name = "counting"
    device_types = ("cpu",)

    def __init__(self):
        self.calls = []

    def supports(self, device):
        return device.type == "cpu"

    def grad_norm(self, buf):
        self.calls.append("grad_norm")
        return super().grad_norm(buf)

    def adam_(self, segs, hp):
        self.calls.append("adam_")
        return super().adam_(segs, hp)


@pytest.fixture
def counting(monkeypatch):
    inst = CountingBackend()
    monkeypatch.setitem(backends._REGISTRY, "counting", backends._Entry("counting", lambda: inst, ("cpu",), 50))
    return inst


def _step(opt, p):
    (p * p).sum().backward()
    opt.step()
    opt.zero_grad()


def test_new_backend_plugs_in_and_is_called_once_per_bucket(counting):
    ps = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2, dtype=torch.bfloat16))]
    opt = fastaccum.AdamW(ps, backend="counting", max_grad_norm=1.0)
    (sum((p.float() ** 2).sum() for p in ps)).backward()
    opt.step()
    # two buckets (fp32, bf16): one norm pass and one update call each, not one per tensor
    assert counting.calls.count("grad_norm") == 2 and counting.calls.count("adam_") == 2


def test_auto_prefers_highest_priority_and_env_overrides(counting, monkeypatch):
    p = nn.Parameter(torch.randn(4))
    assert fastaccum.AdamW([p])._buckets[0].backend is counting
    monkeypatch.setenv("FASTACCUM_BACKEND", "torch")
    assert fastaccum.AdamW([nn.Parameter(torch.randn(4))])._buckets[0].backend.name == "torch"
    monkeypatch.setenv("FASTACCUM_BACKEND", "missing")
    with pytest.raises(fastaccum.BackendUnavailableError, match="missing"):
        fastaccum.AdamW([nn.Parameter(torch.randn(4))])


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    def broken():
        raise ImportError("compiled module missing")

    monkeypatch.setitem(backends._REGISTRY, "broken", backends._Entry("broken", broken, ("cpu",), 99))
    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    with caplog.at_level(logging.DEBUG, logger="fastaccum"):
        for _ in range(3):
            opt = fastaccum.AdamW([nn.Parameter(torch.randn(2))])
    assert opt._buckets[0].backend.name != "broken"
    assert sum("broken" in r.message for r in caplog.records) == 1
    assert "broken" not in fastaccum.available_backends("cpu")
    assert "torch" in fastaccum.available_backends("cpu")


def test_backend_for_wrong_device_is_refused(monkeypatch):
    inst = CountingBackend()
    monkeypatch.setitem(backends._REGISTRY, "cpu-only", backends._Entry("cpu-only", lambda: inst, ("cpu",), -1))
    with pytest.raises(fastaccum.BackendUnavailableError, match="does not run on meta"):
        fastaccum.get_backend("cpu-only", "meta")


def _fallback_records(monkeypatch, caplog, error):
    def loader():
        raise error

    monkeypatch.setitem(backends._REGISTRY, "fast", backends._Entry("fast", loader, ("cpu",), 99))
    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    monkeypatch.delenv("FASTACCUM_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="fastaccum"):
        for _ in range(2):
            opt = fastaccum.AdamW([nn.Parameter(torch.randn(2))])
    assert opt.backends[0][0] != "fast"
    return [r for r in caplog.records if "'fast'" in r.getMessage()], opt.backends[0][0]


def test_auto_fallback_for_a_backend_not_installed_is_logged_at_info(monkeypatch, caplog):
    records, used = _fallback_records(monkeypatch, caplog, ModuleNotFoundError("no module named fastx"))
    assert [r.levelno for r in records] == [logging.INFO], "once, at INFO: visible with logging.INFO"
    msg = records[0].getMessage()
    assert "no module named fastx" in msg and f"uses {used!r} instead" in msg


def test_auto_fallback_for_a_broken_build_warns(monkeypatch, caplog):
    # installed but unloadable (a stale or broken build): a slower run nobody asked for
    records, used = _fallback_records(monkeypatch, caplog, ImportError("stale build (ABI 1, expected 2)"))
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "stale build" in records[0].getMessage() and f"uses {used!r} instead" in records[0].getMessage()


REPO = Path(__file__).resolve().parents[1]


def _python(code: str, env_extra: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTACCUM_")}
    env.update(env_extra, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _line(text: str, start: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(start))


def test_no_ext_at_run_time_keeps_a_built_extension_unloaded():
    # an editable install leaves fastaccum/backends/cpu/_C*.so in the source tree: with
    # FASTACCUM_NO_EXT=1 set, that (possibly stale) build must not be what runs
    code = (
        "import logging, sys, fastaccum\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "print('available', fastaccum.available_backends('cpu'))\n"
        "try:\n    fastaccum.get_backend('cpu')\nexcept fastaccum.BackendUnavailableError as e:\n    print('refused', e)\n"
        "print('loaded', 'fastaccum.backends.cpu._C' in sys.modules)\n"
        "print('auto', fastaccum.AdamW([__import__('torch').nn.Parameter(__import__('torch').zeros(2))]).backends)\n"
    )
    out = _python(code, {"FASTACCUM_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert "'cpu'" not in _line(out.stdout, "available") and "loaded False" in out.stdout, out.stdout
    assert "refused" in out.stdout and "FASTACCUM_NO_EXT=1 is set" in out.stdout, out.stdout
    assert "auto [['torch']]" in out.stdout
    assert "INFO fastaccum: backend='auto' on cpu tensors uses 'torch' instead of 'cpu'" in out.stderr, out.stderr
    assert "WARNING" not in out.stderr, "switched off on purpose: not a warning"
    if _C_BUILT:
        assert "'cpu'" in _line(_python(code, {"FASTACCUM_NO_EXT": "0"}).stdout, "available")


def test_setup_without_the_extension_removes_a_stale_in_tree_build(tmp_path):
    # what `FASTACCUM_NO_EXT=1 pip install -e .` runs, on a copy of the tree with a built _C
    shutil.copy(REPO / "setup.py", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text("x\n")
    cpu = tmp_path / "fastaccum" / "backends" / "cpu"
    cpu.mkdir(parents=True)
    stale = cpu / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"\0")
    keep = cpu / "backend.py"
    keep.write_text("\n")
    out = _python("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py')",
                  {"FASTACCUM_NO_EXT": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not stale.exists() and keep.exists()
    assert "FASTACCUM_NO_EXT" in out.stderr and stale.name in out.stderr

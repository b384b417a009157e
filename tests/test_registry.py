"""The backend registry: auto choice, environment override, fallback, and a new backend
plugged in without touching the optimizer."""
import logging

import pytest
import torch
from torch import nn

import fastaccum
from fastaccum import backends
from fastaccum.backends.torch_backend import TorchBackend


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

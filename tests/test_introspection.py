"""What a user sees of an optimizer from Python: its signature and docstring (``help()``),
the error for a misspelled argument, ``repr()``, and which backend runs each param group."""
from __future__ import annotations

import inspect
import pydoc
import re

import pytest
import torch
from torch import nn

import fastaccum

PUBLIC = (fastaccum.AdamW, fastaccum.Adam, fastaccum.SGD)
# fastaccum's own constructor arguments (SGD keeps fp32 momentum: no state_dtype)
FASTACCUM_ARGS = ("accumulation_steps", "max_grad_norm", "loss_scale", "master_weights", "state_dtype",
                  "backend", "step_in_backward")
TORCH_IGNORED = ("foreach", "fused", "capturable", "differentiable")


def _entries(doc: str) -> dict:
    """The docstring's ``Args:`` section as {argument: its entry, continuation lines joined}."""
    assert "\nArgs:\n" in doc, "the docstring has an Args: section, as torch.optim's have"
    args = doc.split("\nArgs:\n", 1)[1]
    out = {}
    for entry in re.split(r"\n(?=    \w+ \()", "\n" + args.rstrip()):
        if entry.strip():
            name = entry.split()[0]
            out[name] = " ".join(entry.split())
    return out


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_signature_is_explicit_and_has_the_torch_arguments(cls):
    sig = inspect.signature(cls)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, str(sig)
    torch_cls = getattr(torch.optim, cls.__name__)
    for name, p in inspect.signature(torch_cls).parameters.items():
        assert name in sig.parameters, f"{cls.__name__} lacks torch's argument {name!r}"
        assert sig.parameters[name].default == p.default, f"{name}: default differs from torch's"
    for name in FASTACCUM_ARGS:
        if cls is fastaccum.SGD and name == "state_dtype":
            continue
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_docstring_lists_every_argument_with_its_default(cls):
    entries = _entries(inspect.getdoc(cls))
    sig = inspect.signature(cls)
    assert list(entries) == list(sig.parameters), "one entry per argument, in signature order"
    for name, p in sig.parameters.items():
        if p.default is not inspect.Parameter.empty:
            default = repr(p.default) if isinstance(p.default, str) else str(p.default)
            assert entries[name].endswith(f"(default: {default})"), entries[name]
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "**extras" not in text and "accumulation_steps: 'int' = 1" in text


def test_docstring_defaults_follow_the_signature():
    assert _entries(inspect.getdoc(fastaccum.AdamW))["weight_decay"].endswith("(default: 0.01)")
    assert _entries(inspect.getdoc(fastaccum.Adam))["weight_decay"].endswith("(default: 0.0)")
    assert "decoupled" in _entries(inspect.getdoc(fastaccum.AdamW))["weight_decay"]


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_misspelled_argument_names_the_class_and_the_close_match(cls):
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError) as info:
        cls([p], accumulation_step=4)
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}.__init__() got an unexpected keyword argument 'accumulation_step'"), msg
    assert "did you mean 'accumulation_steps'" in msg.lower(), msg
    with pytest.raises(TypeError, match=f"^{cls.__name__}.__init__\\(\\) got an unexpected keyword argument 'zzz'$"):
        cls([p], zzz=1)



def _group_lines(text: str, i: int) -> list:
    block = text.split(f"Parameter Group {i}\n", 1)[1].split("Parameter Group", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.startswith("    ")]


def test_repr_shows_fastaccum_settings_and_backends_not_ignored_keys():
    ps = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = fastaccum.AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}], accumulation_steps=4,
                          max_grad_norm=1.0, loss_scale="dynamic", backend="torch")
    text = repr(opt)
    assert text.startswith("AdamW (\n") and text.endswith("\n)")
    for setting in ("accumulation_steps: 4", "max_grad_norm: 1.0", "loss_scale: 'dynamic'", "master_weights: True",
                    "state_dtype: torch.float32", "backend: 'torch'", "step_in_backward: False"):
        assert f"\n    {setting}\n" in text, (setting, text)
    for key in TORCH_IGNORED:
        assert f"{key}:" not in text, text
    g0, g1 = _group_lines(text, 0), _group_lines(text, 1)
    assert g0[0] == "backends: ['torch']" and "lr: 0.001" in g0 and "weight_decay: 0.01" in g0
    assert "lr: 0.5" in g1 and "betas: (0.9, 0.999)" in g1 and "amsgrad: False" in g1
    # the hyper-parameters are torch's repr's lines, minus the keys fastaccum ignores, plus
    # fastaccum's own group key (the beta2 half-life, None when betas[1] is fixed)
    assert "beta2_halflife_tokens: None" in g1
    ref = repr(torch.optim.AdamW([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.5}]))
    assert [ln for ln in g1[1:] if not ln.startswith("beta2_halflife_tokens")] == [
        ln for ln in _group_lines(ref, 1) if ln.split(":")[0] not in TORCH_IGNORED]


def test_repr_of_sgd_has_no_state_dtype():
    text = repr(fastaccum.SGD([nn.Parameter(torch.randn(2))], momentum=0.9))
    assert "state_dtype" not in text and "momentum: 0.9" in text and "accumulation_steps: 1" in text


def test_backends_per_param_group():
    if "cpu" not in fastaccum.available_backends("cpu"):
        pytest.skip("the C++ extension is not built here")
    fp32, fp64 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = fastaccum.AdamW([{"params": [fp32, fp64]}, {"params": [nn.Parameter(torch.randn(2))]}])
    # float64 buckets run on the torch backend, whatever was asked for
    assert opt.backends == [["cpu", "torch"], ["cpu"]]
    assert "backends: ['cpu', 'torch']" in repr(opt)
    assert fastaccum.AdamW([fp32], backend="torch").backends == [["torch"]]
    with pytest.raises(AttributeError):
        opt.backends = [["torch"]]

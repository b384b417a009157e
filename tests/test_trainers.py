"""Trainers use fastaccum as they use torch.optim: Hugging Face Trainer with its own
accumulation and clipping, and the closure-style step that Lightning calls; with bf16
parameters, the trainers' own clipping and grad-norm logging (HF Trainer, Accelerate,
Lightning) see the fp32 accumulated gradient."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import fastaccum
from conftest import OddNet, batches


def test_closure_step_like_lightning():
    torch.manual_seed(0)
    a = OddNet()
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for x in batches(5):
        for m, o in ((a, oa), (b, ob)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = m(x).mean()
                loss.backward()
                return loss

            loss = o.step(closure)
            assert loss is not None
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# the torch backend mirrors torch.optim's math; kernels are held to DESIGN's kernel tolerance
@pytest.mark.parametrize("backend,tol", [("torch", dict(rtol=1e-6, atol=1e-7)), ("auto", dict(rtol=1e-5, atol=1e-6))])
def test_hugging_face_trainer(tmp_path, backend, tol):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    def run(make_opt):
        transformers.set_seed(0)
        config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
        g = torch.Generator().manual_seed(1)
        data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=g)]
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=4, learning_rate=1e-3, max_grad_norm=0.5, lr_scheduler_type="constant", use_cpu=True,
            report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0,
        )
        opt = make_opt(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train()
        return model, opt

    ours, opt = run(lambda m: fastaccum.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, backend=backend))
    ref, _ = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0))
    assert opt.state[next(ours.parameters())]["step"].item() == 4
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol)


# ---------------------------------------------------------------- bf16 parameters in trainers
# Each trainer clips with its own max_grad_norm / clip_grad_norm_ / gradient_clip_val on a
# pure-bf16 tiny GPT-2 (built from a config: no download). The examples/ scripts are the runs.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLIP = 1.0


def _example(name):
    spec = importlib.util.spec_from_file_location(f"fastaccum_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _buffer_norm(params):
    """Norm of the fp32 accumulated gradient, read from the buffer itself (``p.main_grad``)."""
    sq = sum(p.main_grad.double().pow(2).sum() for p in params if p.grad is not None)
    return float(sq) ** 0.5


def _assert_norms(seen, truth):
    assert len(seen) == len(truth) > 0
    for s, t in zip(seen, truth):
        assert abs(s - t) <= 1e-3 * t, f"reported {s} vs fp32 accumulated gradient {t}"
    # clipping must actually engage: some windows' gradients exceed the clip
    assert max(truth) > CLIP


def _assert_params_equal(a, b, dtype=torch.bfloat16):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == dtype
        torch.testing.assert_close(p, q, msg=f"parameter {name}")  # bf16: torch's bf16 tolerance


def _assert_params_differ(a, b):
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _fastaccum_clip(model):
    return fastaccum.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, max_grad_norm=CLIP)


def _fastaccum_plain(model):
    return fastaccum.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)


def test_hugging_face_trainer_bf16_clips_and_logs_the_fp32_gradient(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ex = _example("hf_trainer_bf16")
    truth = []

    class BufferNorm(transformers.TrainerCallback):
        # called after the Trainer's clip, before the step: the buffer still holds the
        # unclipped gradient, because the clip's scaling is folded into the update (no pass)
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            truth.append(_buffer_norm(model.parameters()))

    model, opt, norms = ex.train(str(tmp_path / "a"), max_grad_norm=CLIP, accumulation=3, steps=4,
                                 callbacks=[BufferNorm()])
    _assert_norms(norms, truth)
    assert opt.state[next(model.parameters())]["step"].item() == 4

    # the Trainer's clip equals fastaccum's own max_grad_norm= (the Trainer then only logs)
    ref, _, ref_norms = ex.train(str(tmp_path / "b"), max_grad_norm=0.0, accumulation=3, steps=4,
                                 make_optimizer=_fastaccum_clip)
    _assert_params_equal(model, ref)
    assert ref_norms == pytest.approx(norms, rel=1e-6)
    unclipped, _, _ = ex.train(str(tmp_path / "c"), max_grad_norm=0.0, accumulation=3, steps=4,
                               make_optimizer=_fastaccum_plain)
    _assert_params_differ(model, unclipped)


def test_accelerate_bf16_clip_grad_norm_sees_the_fp32_gradient():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ex = _example("accelerate_bf16")
    truth = []
    model, _, norms = ex.train(max_grad_norm=CLIP, accumulation=4, steps=3,
                               on_clip=lambda m: truth.append(_buffer_norm(m.parameters())))
    _assert_norms(norms, truth)
    ref, _, _ = ex.train(max_grad_norm=None, accumulation=4, steps=3, make_optimizer=_fastaccum_clip)
    _assert_params_equal(model, ref)
    unclipped, _, _ = ex.train(max_grad_norm=None, accumulation=4, steps=3)
    _assert_params_differ(model, unclipped)


def test_accelerate_fp32_unchanged():
    """fp32 parameters: p.grad is the plain fp32 view, as before; equal to torch.optim.AdamW."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ex = _example("accelerate_bf16")
    ours, _, norms = ex.train(dtype=torch.float32, steps=3)
    ref, _, ref_norms = ex.train(dtype=torch.float32, steps=3, make_optimizer=lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-3, weight_decay=0.0))
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lightning_bf16_true_clips_by_the_fp32_gradient():
    pytest.importorskip("transformers")
    pl = pytest.importorskip("lightning.pytorch")
    ex = _example("lightning_bf16")
    truth = []

    class BufferNorm(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            truth.append(_buffer_norm(pl_module.parameters()))

    module = ex.train(accumulation=2, steps=4, callbacks=[BufferNorm()])
    _assert_norms(module.norms, truth)  # lightning.pytorch.utilities.grad_norm's total
    ref = ex.train(gradient_clip_val=None, accumulation=2, steps=4, make_optimizer=_fastaccum_clip)
    _assert_params_equal(module, ref)
    unclipped = ex.train(gradient_clip_val=None, accumulation=2, steps=4)
    _assert_params_differ(module, unclipped)


def test_lightning_fp32_unchanged():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning.pytorch")
    ex = _example("lightning_bf16")
    ours = ex.train(precision="32-true", steps=3)
    ref = ex.train(precision="32-true", steps=3, make_optimizer=lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-3, weight_decay=0.0))
    assert ours.norms == pytest.approx(ref.norms, rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

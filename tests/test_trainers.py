"""Trainers use fastaccum as they use torch.optim: Hugging Face Trainer with its own
accumulation and clipping, and the closure-style step that Lightning calls."""
import copy

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

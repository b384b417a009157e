"""Hugging Face Trainer, a pure-bf16 model, fastaccum.AdamW: nothing else changes.

The model's parameters are bf16 (as after ``from_pretrained(..., torch_dtype=torch.bfloat16)``);
fastaccum accumulates their gradients in fp32 and updates fp32 master weights. The Trainer
keeps its own accumulation (``gradient_accumulation_steps``), its clipping
(``max_grad_norm``) and its ``grad_norm`` log: they see the fp32 accumulated gradient,
because a bf16 parameter's ``p.grad`` is a view of its fp32 buffer segment
(``fastaccum.GradView``).

    python examples/hf_trainer_bf16.py        # a tiny GPT-2 built from a config, CPU, a few seconds
"""
import tempfile

import torch
import transformers

import fastaccum


def tiny_gpt2(dtype=torch.bfloat16):
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def dataset(n=48, seq_len=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, seq_len), generator=g)]


def train(output_dir, *, dtype=torch.bfloat16, max_grad_norm=1.0, accumulation=2, steps=6,
          make_optimizer=None, callbacks=()):
    """Train with the Trainer; return the model, the optimizer and the logged grad norms."""
    transformers.set_seed(0)
    model = tiny_gpt2(dtype)
    if make_optimizer is None:
        opt = fastaccum.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # was torch.optim.AdamW
    else:
        opt = make_optimizer(model)
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-3, max_grad_norm=max_grad_norm, lr_scheduler_type="constant",
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None),
                                   callbacks=list(callbacks))
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return model, opt, norms


def main():
    with tempfile.TemporaryDirectory() as d:
        _, _, norms = train(d)
    print("logged grad_norm (pre-clip, fp32 accumulated gradient):", ", ".join(f"{n:.4f}" for n in norms))
    return norms


if __name__ == "__main__":
    main()

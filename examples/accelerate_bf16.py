"""Accelerate: an ``accelerator.accumulate`` loop with a pure-bf16 model and fastaccum.AdamW.

``accelerator.clip_grad_norm_(model.parameters(), max_norm)`` clips by, and returns, the norm
of the fp32 accumulated gradient: a bf16 parameter's ``p.grad`` is a view of its fp32 buffer
segment (``fastaccum.GradView``). The clip costs one read pass, as fastaccum's own
``max_grad_norm=``: its scaling is folded into the update.

    python examples/accelerate_bf16.py        # a tiny GPT-2 built from a config, CPU, a few seconds
"""
import torch
import transformers
from accelerate import Accelerator

import fastaccum


def tiny_gpt2(dtype=torch.bfloat16):
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def loader(n=48, seq_len=12, batch_size=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, seq_len), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=batch_size)


def train(*, dtype=torch.bfloat16, max_grad_norm=1.0, accumulation=2, steps=6, make_optimizer=None,
          on_clip=None):
    """Train; return the model, the optimizer and the norms ``clip_grad_norm_`` returned."""
    torch.manual_seed(0)
    model = tiny_gpt2(dtype)
    if make_optimizer is None:
        opt = fastaccum.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # was torch.optim.AdamW
    else:
        opt = make_optimizer(model)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    model, opt, data = accelerator.prepare(model, opt, loader(n=2 * accumulation * steps))
    norms = []
    for batch in data:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm:
                if on_clip is not None:
                    on_clip(model)
                norms.append(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm).item())
            opt.step()
            opt.zero_grad()
    return accelerator.unwrap_model(model), opt, norms


def main():
    _, _, norms = train()
    print("clip_grad_norm_ returned (fp32 accumulated gradient):", ", ".join(f"{n:.4f}" for n in norms))
    return norms


if __name__ == "__main__":
    main()

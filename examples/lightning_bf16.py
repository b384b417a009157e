"""Lightning, ``precision="bf16-true"``, ``gradient_clip_val`` and ``accumulate_grad_batches``
with fastaccum.AdamW returned from ``configure_optimizers``: nothing else changes.

Lightning's clipping (``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters) and
``lightning.pytorch.utilities.grad_norm`` see the fp32 accumulated gradient: a bf16
parameter's ``p.grad`` is a view of its fp32 buffer segment (``fastaccum.GradView``).

    python examples/lightning_bf16.py         # a tiny GPT-2 built from a config, CPU, a few seconds
"""
import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.utilities import grad_norm

import fastaccum


class TinyGPT2(pl.LightningModule):
    def __init__(self, make_optimizer=None):
        super().__init__()
        config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
        self.model = transformers.GPT2LMHeadModel(config)  # "bf16-true" casts it to bf16
        self.make_optimizer = make_optimizer
        self.norms = []  # total grad norm before clipping, one per optimizer step

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def on_before_optimizer_step(self, optimizer):
        # Lightning's documented way to log gradient norms
        self.norms.append(float(grad_norm(self, norm_type=2)["grad_2.0_norm_total"]))

    def configure_optimizers(self):
        if self.make_optimizer is not None:
            return self.make_optimizer(self)
        return fastaccum.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)  # was torch.optim.AdamW


def loader(n=48, seq_len=12, batch_size=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, seq_len), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=batch_size)


def train(*, precision="bf16-true", gradient_clip_val=1.0, accumulation=2, steps=6, make_optimizer=None,
          callbacks=()):
    """Train; return the LightningModule (its ``norms``: the total grad norm before each clip)."""
    pl.seed_everything(0, verbose=False)
    module = TinyGPT2(make_optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=precision, gradient_clip_val=gradient_clip_val,
        accumulate_grad_batches=accumulation, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )
    trainer.fit(module, loader(n=2 * accumulation * steps))
    return module


def main():
    module = train()
    print("grad norm before clipping (fp32 accumulated gradient):", ", ".join(f"{n:.4f}" for n in module.norms))
    return module.norms


if __name__ == "__main__":
    main()

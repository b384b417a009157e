"""The README's managed loop passes ``weight=<expression>`` to ``opt.backward``: that expression
must count exactly the tokens a Hugging Face causal LM's loss averages over, or the update is
not the token mean of the accumulated batch. A tiny GPT-2 built from a config (no download)
checks the very expression the README shows."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fastaccum

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_weight_expression() -> str:
    """The ``weight=`` argument of the README's ``opt.backward(out.loss, weight=...)`` line."""
    line = next(ln for ln in README.read_text().splitlines() if "opt.backward(out.loss, weight=" in ln)
    rest = line.split("weight=", 1)[1]
    depth = 0
    for i, ch in enumerate(rest):  # up to the parenthesis that closes opt.backward(
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return rest[:i]
    raise AssertionError(f"unbalanced weight= expression in README: {line}")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(lengths, seq_len: int = 32, seed: int = 0) -> dict:
    """Right-padded sequences, labels = input_ids with -100 on padding (what the collators do)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 50, (len(lengths), seq_len), generator=g)
    attention_mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _weight(batch: dict) -> torch.Tensor:
    return eval(readme_weight_expression(), {"torch": torch}, {"batch": batch})  # noqa: S307


def test_readme_weight_is_the_count_the_causal_lm_loss_averages_over():
    model = _model()
    batch = _batch([32, 20, 27, 25])  # 104 real tokens, 100 predicted ones
    out = model(**batch)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    token_sum = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    weight = _weight(batch)
    assert int(weight) == 100 and int(batch["attention_mask"].sum()) == 104
    torch.testing.assert_close(out.loss * weight, token_sum)


def test_readme_weight_makes_the_update_the_token_mean_of_the_window():
    # two micro-batches with different token counts through the README's loop equal one
    # step on the whole batch's token mean
    a = _model()
    b = copy.deepcopy(a)
    micro = [_batch([32, 9], seed=1), _batch([30, 31], seed=2)]
    opt = fastaccum.SGD(a.parameters(), lr=1.0, accumulation_steps=2, backend="torch")
    for batch in micro:
        out = a(**batch)
        opt.backward(out.loss, weight=_weight(batch))
        opt.step()
        opt.zero_grad()
    ref = torch.optim.SGD(b.parameters(), lr=1.0)
    total = sum(
        torch.nn.functional.cross_entropy(
            (out := b(**batch)).logits[:, :-1].reshape(-1, out.logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        for batch in micro
    )
    n_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro)
    (total / n_tokens).backward()
    ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


"""Per-sample NLL: supervised tokens only, fp32, same values and gradients as a plain row loop;
`token_nll` equal to F.cross_entropy in value and gradient whatever the chunking."""

import pytest
import torch
import torch.nn.functional as F

import irdro.model
from irdro.model import per_sample_nll, token_nll


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(logits.shape[0]):
        t = labels[b, 1:]
        n = int((t != -100).sum())
        rows.append(F.cross_entropy(logits[b, :-1].float(), t, ignore_index=-100, reduction="sum") / max(n, 1))
    return torch.stack(rows)


def test_matches_row_loop_values_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 9))
    labels[0, :4] = -100  # a masked prompt
    labels[2] = -100  # nothing supervised: loss 0, count 0, no NaN
    losses, counts = per_sample_nll(logits, labels)
    ref = reference(logits, labels)
    assert counts.tolist() == [5, 8, 0] and losses[2] == 0 and torch.isfinite(losses).all()
    assert torch.allclose(losses, ref, atol=1e-6)
    g, g_ref = (torch.autograd.grad(x.sum(), logits)[0] for x in (losses, ref))
    assert torch.allclose(g, g_ref, atol=1e-7)


def test_pad_equal_to_eos_is_still_supervised():
    """Only -100 masks a target: a real EOS whose id equals the pad id keeps its loss."""
    logits = torch.zeros(1, 3, 5)
    labels = torch.tensor([[1, 2, 4]])  # 4 = eos = pad in many tokenizers
    _, counts = per_sample_nll(logits, labels)
    assert counts.tolist() == [2]


def test_bf16_logits_give_fp32_losses():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    losses, _ = per_sample_nll(logits.bfloat16(), labels)
    assert losses.dtype == torch.float32
    assert torch.allclose(losses, reference(logits.bfloat16().float(), labels), atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 1 << 24])  # 1 row, 7 rows (ragged end), all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_equals_cross_entropy(monkeypatch, chunk_elements, dtype):
    monkeypatch.setattr(irdro.model, "NLL_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(2)
    logits = (torch.randn(40, 50) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (40,))
    targets[::3] = -100
    g = torch.randn(40)
    ours = token_nll(logits, targets)
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    assert ours.dtype == torch.float32 and ours.shape == (40,)
    assert torch.allclose(ours, ref, atol=2e-6) and (ours[::3] == 0).all()
    grad, grad_ref = (torch.autograd.grad((x * g).sum(), logits)[0] for x in (ours, ref))
    assert grad.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: one rounding step of the stored grad
    assert torch.allclose(grad.float(), grad_ref.float(), rtol=rtol, atol=1e-6)
    assert grad.float().abs().sum() > 0


def test_token_nll_ignored_positions_get_zero_gradient_even_if_non_finite():
    """A padded position whose logits overflowed must not poison the step (NaN * 0 is NaN)."""
    logits = torch.randn(3, 5)
    logits[1] = float("inf")
    logits.requires_grad_()
    nll = token_nll(logits, torch.tensor([2, -100, 4]))
    assert torch.isfinite(nll).all() and nll[1] == 0
    (grad,) = torch.autograd.grad(nll.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_token_nll_under_no_grad():
    with torch.no_grad():
        nll = token_nll(torch.randn(4, 6), torch.tensor([0, 1, -100, 5]))
    assert nll.shape == (4,) and not nll.requires_grad

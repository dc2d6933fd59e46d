"""Per-sample NLL: supervised tokens only, fp32, same values and gradients as a plain row loop."""

import torch
import torch.nn.functional as F

from irdro.model import per_sample_nll


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(logits.shape[0]):
        t = labels[b, 1:]
        n = int((t != -100).sum())
        rows.append(
            F.cross_entropy(logits[b, :-1].float(), t, ignore_index=-100, reduction="sum")
            / max(n, 1)
        )
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


def test_bf16_logits_are_upcast_per_row():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    losses, _ = per_sample_nll(logits.bfloat16(), labels)
    assert losses.dtype == torch.float32
    assert torch.allclose(losses, reference(logits.bfloat16().float(), labels), atol=1e-5)

"""What only a CUDA device can show: the loss path in bf16/fp32 on CUDA, packed rows on CUDA, and
irdro.dist under NCCL (world size 1). Skipped without CUDA (tests/conftest.py); run on a GPU by
benchmarks/gpu_check.py (`pytest -m gpu tests/gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

import irdro.model
from irdro import dist
from irdro.data import collate, collate_packed
from irdro.model import (
    block_causal_mask,
    packed_forward,
    packed_sample_nll,
    per_sample_nll,
    token_nll,
)
from irdro.shards import Sample

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def logits_and_targets(n: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.25] = -100  # unsupervised positions
    return logits, targets


# (dtype, N, V, chunk elements): small chunks exercise the chunk loop; the last case is a real
# vocabulary with the module's own chunk size.
NLL_CASES = [
    (torch.float32, 300, 1000, 1 << 12),
    (torch.bfloat16, 300, 1000, 1 << 12),
    (torch.bfloat16, 2048, 32000, None),
    (torch.float32, 1024, 50257, None),
]


@pytest.mark.parametrize(("dtype", "n", "vocab", "chunk"), NLL_CASES, ids=lambda x: str(x))
def test_token_nll_matches_cross_entropy_on_cuda(monkeypatch, dtype, n, vocab, chunk) -> None:
    """Value and gradient of token_nll equal F.cross_entropy(logits.float(), reduction="none")."""
    if chunk is not None:
        monkeypatch.setattr(irdro.model, "NLL_CHUNK_ELEMENTS", chunk)
    logits, targets = logits_and_targets(n, vocab, dtype)
    logits, targets = logits.to(CUDA), targets.to(CUDA)
    weights = torch.rand(n, device=CUDA) + 0.5  # per-position weights: the gradient is not uniform

    got_in = logits.clone().requires_grad_()
    got = token_nll(got_in, targets)
    (weights * got).sum().backward()
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float(), targets, reduction="none")
    (weights * ref).sum().backward()

    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert got_in.grad.dtype == dtype
    assert bool((got[targets == -100] == 0).all())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # bf16 gradients: both round the same fp32 values; a 1-ulp flip is the most allowed
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-7)
    torch.testing.assert_close(got_in.grad, ref_in.grad, **tol)
    assert bool((got_in.grad[targets == -100] == 0).all())


def test_token_nll_ignored_positions_stay_finite_on_cuda() -> None:
    """Non-finite logits at unsupervised positions give a 0 loss and a 0 gradient there."""
    logits, targets = logits_and_targets(64, 512, torch.bfloat16)
    targets[:4] = -100
    logits[:4] = float("nan")
    x = logits.to(CUDA).requires_grad_()
    nll = token_nll(x, targets.to(CUDA))
    nll.sum().backward()
    assert bool(torch.isfinite(nll).all()) and bool(torch.isfinite(x.grad).all())


def test_packed_losses_and_masks_on_cuda_equal_cpu() -> None:
    """block_causal_mask, packed_sample_nll and per_sample_nll give on CUDA what they give on CPU."""
    g = torch.Generator().manual_seed(1)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1], [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, -1, -1]])
    labels = torch.randint(0, 97, seg.shape, generator=g)
    labels[seg == -1] = -100
    labels[0, 5] = -100  # a masked prompt token
    for attention, dtype in (
        ("sdpa", torch.bool),
        ("eager", torch.bfloat16),
        ("eager", torch.float32),
    ):
        cpu = block_causal_mask(seg, attention, torch.float32 if dtype == torch.bool else dtype)
        gpu = block_causal_mask(seg.to(CUDA), attention, torch.float32 if dtype == torch.bool else dtype)
        assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
        assert torch.equal(gpu.cpu(), cpu)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(*seg.shape, 97, generator=g).to(dtype)
        ref_losses, ref_counts = packed_sample_nll(logits, labels, seg, 5)
        losses, counts = packed_sample_nll(logits.to(CUDA), labels.to(CUDA), seg.to(CUDA), 5)
        assert losses.device.type == "cuda" and losses.dtype == torch.float32
        assert torch.equal(counts.cpu(), ref_counts) and bool((ref_counts > 0).all())
        torch.testing.assert_close(losses.cpu(), ref_losses, rtol=1e-5, atol=1e-5)
        ref_losses, ref_counts = per_sample_nll(logits, labels)
        losses, counts = per_sample_nll(logits.to(CUDA), labels.to(CUDA))
        assert torch.equal(counts.cpu(), ref_counts)
        torch.testing.assert_close(losses.cpu(), ref_losses, rtol=1e-5, atol=1e-5)


def synthetic_samples(vocab: int) -> list[Sample]:
    """Documents of uneven lengths; two with a masked prompt (labels -100 on their first tokens)."""
    rng = np.random.default_rng(0)
    out = []
    for i, length in enumerate((37, 20, 64, 5, 50, 12, 29, 44)):
        ids = rng.integers(0, vocab, length).astype(np.int64)
        labels = ids.copy()
        if i in (1, 4):
            labels[: length // 3] = -100
        out.append(Sample(sample_id=i, input_ids=ids, labels=labels, doc_id=i, chunk_id=0))
    return out


def tiny_llama(dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # 10x the default: documents leaking into each other show clearly
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(CUDA).eval()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@torch.no_grad()
def test_packed_rows_on_cuda_equal_unpacked(dtype, tol) -> None:
    """A tiny Llama on CUDA (sdpa): per-document losses of packed rows equal the unpacked ones;
    without the block mask (negative control) they do not."""
    model = tiny_llama(dtype)
    samples = synthetic_samples(512)
    batch = {k: v.to(CUDA) for k, v in collate(samples, pad_id=0).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref, ref_counts = per_sample_nll(logits, batch["labels"])

    packed = {k: v.to(CUDA) for k, v in collate_packed(samples, pad_id=0, seq_len=128).items()}
    assert packed["input_ids"].shape[0] < len(samples)  # rows really hold several documents
    got, counts = packed_sample_nll(
        packed_forward(model, packed), packed["labels"], packed["segment_ids"], len(samples)
    )
    assert torch.equal(counts, ref_counts)
    assert float((got - ref).abs().max()) <= tol

    leaky_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    leaky, _ = packed_sample_nll(leaky_logits, packed["labels"], packed["segment_ids"], len(samples))
    assert float((leaky - ref).abs().max()) > 0.2  # about 1.3 for this model (CPU, fp32 and bf16)


# ----------------------------------------------------------------------------- irdro.dist on NCCL


@pytest.fixture(scope="module")
def nccl_world(tmp_path_factory):
    """A one-rank NCCL process group for this module (file store: no port to pick)."""
    if tdist.is_initialized():
        pytest.fail("a process group is already initialised", pytrace=False)
    torch.cuda.set_device(0)
    store = tmp_path_factory.mktemp("nccl") / "store"
    tdist.init_process_group("nccl", init_method=f"file://{store}", world_size=1, rank=0)
    yield
    tdist.destroy_process_group()


def test_comm_device_is_the_current_cuda_device(nccl_world) -> None:
    assert tdist.get_backend() == "nccl"
    assert dist.is_initialized() and dist.dp_size() == 1 and dist.dp_rank() == 0
    assert dist.comm_device() == torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_collectives_return_on_the_callers_device(nccl_world, device, dtype) -> None:
    """Every irdro.dist collective works under NCCL for CPU and CUDA inputs, returns its result on
    the caller's device, and leaves the input as it was."""
    x = torch.arange(12, dtype=dtype).reshape(4, 3).to(device)
    before = x.clone()

    gathered = dist.all_gather_losses(x)
    assert gathered.device == x.device and gathered.dtype == dtype
    assert torch.equal(gathered, x[None])
    out = dist.all_reduce_sum(x)
    assert out.device == x.device and out.dtype == dtype and torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a new tensor
    assert torch.equal(x, before)


def test_objects_and_barrier_under_nccl(nccl_world) -> None:
    obj = {"step": 3, "tag": "step_00000003", "ids": [1, 2]}
    assert dist.broadcast_object(obj) == obj
    dist.barrier()

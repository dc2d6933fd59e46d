"""Resume state that only goes wrong on a GPU: optimizer step tensors after an elastic load."""

from __future__ import annotations

from pathlib import Path

import torch

from irdro.checkpoint import own_step_tensors, rng_state, set_rng_state


def test_shared_or_misplaced_step_tensors_get_their_own_copy() -> None:
    """DeepSpeed's universal load assigns one CPU `step` to every ZeRO-3 sub-group; each parameter
    must end up with its own step (else it counts once per sub-group) on its own device."""
    params = [torch.nn.Parameter(torch.ones(3, device="cpu")) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shared = torch.tensor(7.0, device="cpu")
    for p in params:
        opt.state[p]["step"] = shared
    assert own_step_tensors(opt) == 2  # the first keeps the object, the others get copies
    steps = [opt.state[p]["step"] for p in params]
    assert len({id(s) for s in steps}) == 3 and all(float(s) == 7.0 for s in steps)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [8.0, 8.0, 8.0]
    assert own_step_tensors(opt) == 0  # already fine: nothing to do


def test_rng_state_round_trip_restores_the_streams() -> None:
    state = rng_state()
    a = torch.rand(3, device="cpu")
    set_rng_state(state)
    assert torch.equal(a, torch.rand(3, device="cpu"))


def test_a_tensor_parallel_checkpoint_resumes_only_on_its_layout() -> None:
    import pytest

    from irdro.checkpoint import ResumePoint
    from irdro.config import ConfigError, recipe_from_dict
    from irdro.train import check_resume_layout

    base = {"output_dir": "runs/x", "model": {"path": "m", "tokenizer": "t"}, "data": {"train": "d"}}
    tp2 = recipe_from_dict({**base, "parallel": {"tensor_parallel": 2}})
    point = ResumePoint(Path("ck/step_3"), 3, world_size=1, tensor_parallel=2)
    check_resume_layout(point, tp2, dp=1)
    with pytest.raises(ConfigError, match=r"^parallel: .* x 2 tensor-parallel ranks, this launch has 1 x 1 x 1;"):
        check_resume_layout(point, recipe_from_dict(base), dp=1)
    with pytest.raises(ConfigError, match=r"x 2 tensor-parallel ranks, this launch has 2 x 1 x 2"):
        check_resume_layout(point, tp2, dp=2)  # no elastic resume of an AutoTP tag
    with pytest.raises(ConfigError, match=r"x 1 tensor-parallel ranks, this launch has 1 x 1 x 2"):
        check_resume_layout(ResumePoint(Path("ck/step_3"), 3, world_size=1), tp2, dp=1)

"""Resume state that only goes wrong on a GPU: optimizer step tensors after an elastic load."""

from __future__ import annotations

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


def _tag(tmp_path, tp: int):
    """A tag holding only DeepSpeed's model-states file of TP rank 0, saved with AutoTP degree `tp`."""
    from irdro.checkpoint import ResumePoint

    tag = tmp_path / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    states = {"checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": tp}}
    torch.save(states, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return ResumePoint(tag_dir=tag, step=3, world_size=1)


def test_a_tensor_parallel_checkpoint_resumes_only_on_its_layout(tmp_path) -> None:
    import pytest

    from irdro.checkpoint import load, prepare_elastic
    from irdro.config import ConfigError

    class Engine:  # what `load` asks of a DeepSpeed engine before it touches the files
        def __init__(self, tp: int) -> None:
            self.tp = tp

        def autotp_size(self) -> int:
            return self.tp

    point = _tag(tmp_path, tp=2)
    with pytest.raises(ConfigError, match=r"^resume: .* parallel.tensor_parallel=2 on 1 data-parallel ranks; Deep"):
        prepare_elastic(point)
    with pytest.raises(ConfigError, match=r"^resume: .* parallel.tensor_parallel=2, this launch has 1;"):
        load(Engine(0), point, elastic=False, global_batch=4)
    with pytest.raises(ConfigError, match=r"tensor_parallel=1, this launch has 2;"):
        load(Engine(2), _tag(tmp_path / "b", tp=1), elastic=False, global_batch=4)

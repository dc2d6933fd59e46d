"""`irdro.engine.gradients_divided_by` on real (1-process) DeepSpeed ZeRO engines: the one place
irdro relies on DeepSpeed internals. Fails if an upgrade changes them: the accumulated gradients
must be divided before the norm and the clip, the reported norm must be the divided one, and the
loss scale must be 1.0 again afterwards."""

from __future__ import annotations

import os

import pytest
import torch

from irdro.engine import free_port, gradients_divided_by

Z = 8.0
CLIP = 1.0


@pytest.fixture(scope="module")
def process_group():
    """A gloo world of one for DeepSpeed, torn down after the module."""
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_initialized():
        yield
        return
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    tdist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def engine_for(stage: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # irdro's resolved DS JSON sets it too (client optimizers)
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config=config,
    )
    return engine


def one_step(engine, divide: bool) -> float:
    """Two micro-batches; the loss (the second divided by Z unless `divide`) is large enough that the
    undivided gradient is clipped and the divided one is not."""
    x = torch.linspace(-1, 1, 8).view(2, 4) * 3
    for m in range(2):
        loss = engine(x[m : m + 1]).square().sum() * 2
        engine.backward(loss if divide else loss / Z)
        with gradients_divided_by(engine, Z if divide and m == 1 else 1.0):
            engine.step()
    assert engine.optimizer.loss_scale == 1.0  # restored: the next backward is not scaled
    return float(engine.get_global_grad_norm())


def params(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("stage", [2, 3])
def test_boundary_step_divides_before_the_norm_and_the_clip(process_group, stage):
    divided, reference = engine_for(stage), engine_for(stage)
    norm = one_step(divided, divide=True)
    ref_norm = one_step(reference, divide=False)  # the same gradients, divided in the loss instead
    assert ref_norm < CLIP < ref_norm * Z, "the case must clip the undivided gradient only"
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    a, b = params(divided), params(reference)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # a second step without division is plain again (the scale did not stick)
    assert one_step(divided, divide=False) == pytest.approx(one_step(reference, divide=False), rel=1e-6)


def test_refuses_a_bad_normaliser(process_group):
    engine = engine_for(3)
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            with gradients_divided_by(engine, bad):
                pass
    assert engine.optimizer.loss_scale == 1.0

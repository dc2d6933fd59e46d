"""Strict recipes: unknown keys, wrong types, bad choices and batch arithmetic name the dotted key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irdro.config import ConfigError, load_recipe, recipe_from_dict, resolve_ds_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "output_dir": "runs/x",
    "model": {"config": {"model_type": "llama"}, "tokenizer": "tok"},
    "data": {"train": "data/x"},
}


def write(tmp_path, raw, name="r.yaml"):
    import yaml

    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def test_defaults_and_overrides_coerce_types(tmp_path):
    r = load_recipe(
        write(tmp_path, BASE),
        ["optim.lr=1e-5", "max_steps=7", "reweight.scheme=irdro", "optim.betas=[0.9, 0.99]", "reweight.lam=2"],
    )
    assert r.optim.lr == 1e-5 and isinstance(r.optim.lr, float)  # YAML reads 1e-5 as a string
    assert r.max_steps == 7 and r.reweight.lam == 2.0 and r.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reweight.lamm=2", "unknown key reweight.lamm; did you mean reweight.lam"),
        ("optimm.lr=2", "unknown key optimm; did you mean optim"),
        ("reweight.scheme=irdo", "did you mean irdro"),
        ("reweight.window=steps", "did you mean step"),
        ("max_steps=abc", "max_steps: expected an integer"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected true/false"),
        ("reweight.lam=0", "reweight.lam: must be a finite number > 0"),
        ("reweight.trim_top=1.0", "reweight.trim_top"),
        ("reweight.frac=0", "reweight.frac"),
        ("model.path=somewhere", "model.path: set exactly one"),
        ("model.dtype=fp16", "model.dtype: 'fp16' is not one of fp32, bf16"),
        ("reweight.signal=excesss", "reweight.signal: 'excesss' is not one of loss, excess"),
        ("reweight.normalize=per_rank", "reweight.normalize: 'per_rank' is not one of global, local"),
        ("reweight.reference=a/b", "reweight.reference: must be the name of a score set"),
    ],
)
def test_errors_name_the_dotted_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(write(tmp_path, BASE), [override])


def test_midrank_empty_band_is_a_config_error_at_load(tmp_path):
    over = ["reweight.scheme=midrank", "reweight.frac=0.2", "micro_batch_size=2"]
    with pytest.raises(ConfigError, match="reweight.frac: MidRanking band is empty"):
        load_recipe(write(tmp_path, BASE), over, world_size=2)
    load_recipe(write(tmp_path, BASE), [*over, "reweight.window=step", "grad_accum_steps=2"], world_size=2)
    with pytest.raises(ConfigError, match="reweight.portion"):
        load_recipe(
            write(tmp_path, BASE),
            ["reweight.scheme=midrank", "reweight.frac=0.5", "reweight.portion=2", "micro_batch_size=4"],
            world_size=1,
        )


def test_local_normalisation_checks_the_band_of_one_rank(tmp_path):
    """normalize local: MidRanking ranks each rank's share of the window (here 2 of 4 samples)."""
    over = ["reweight.scheme=midrank", "reweight.frac=0.25", "reweight.portion=1", "micro_batch_size=2"]
    load_recipe(write(tmp_path, BASE), over, world_size=2)  # global window 4: band [1, 2)
    with pytest.raises(ConfigError, match="reweight.frac: MidRanking band is empty: floor.0.25 x window 2."):
        load_recipe(write(tmp_path, BASE), [*over, "reweight.normalize=local"], world_size=2)


def test_global_batch_is_checked_against_world_size(tmp_path):
    over = ["micro_batch_size=2", "grad_accum_steps=3", "global_batch_size=12"]
    load_recipe(write(tmp_path, BASE), over, world_size=2)
    with pytest.raises(ConfigError, match=r"global_batch_size: 12 != .* = 6"):
        load_recipe(write(tmp_path, BASE), over, world_size=1)


def test_world_is_dp_times_sp_times_tp(tmp_path):
    over = ["micro_batch_size=2", "grad_accum_steps=3", "global_batch_size=12", "parallel.sequence_parallel=2"]
    r = load_recipe(write(tmp_path, BASE), over, world_size=4)  # DP 2 x SP 2
    assert r.data_parallel_size(4) == 2 and r.model_parallel_size == 2
    assert resolve_ds_config(r, 4)["train_batch_size"] == 12
    with pytest.raises(ConfigError, match=r"global_batch_size: 12 != .* data-parallel size 1 = 6"):
        load_recipe(write(tmp_path, BASE), over, world_size=2)
    with pytest.raises(ConfigError, match=r"^parallel: world size 3 is not divisible by .* = 2"):
        load_recipe(write(tmp_path, BASE), over, world_size=3)
    with pytest.raises(ConfigError, match=r"^parallel: sequence_parallel and tensor_parallel cannot both"):
        load_recipe(write(tmp_path, BASE), ["parallel.sequence_parallel=2", "parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel: must be >= 1"):
        load_recipe(write(tmp_path, BASE), ["parallel.tensor_parallel=0"])


def test_ds_json_merge_fills_recipe_keys(tmp_path):
    r = recipe_from_dict(
        {
            **BASE,
            "micro_batch_size": 3,
            "grad_accum_steps": 2,
            "optim": {"grad_clip": 0.5},
            "ds_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        }
    )
    ds = resolve_ds_config(r, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train_batch_size": 8}, "sets 'train_batch_size', which the recipe owns"),
        ({"optimizer": {"type": "AdamW"}}, "sets 'optimizer'"),
        (
            {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
            r"zero_optimization.reduce_bucket_size = \"auto\"",
        ),
        ({"bf16": {"enabled": True}}, "model.dtype: fp32 but"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ],
)
def test_ds_json_that_sets_owned_keys_or_auto_is_refused(tmp_path, content, message):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(content))
    r = recipe_from_dict({**BASE, "ds_config": str(p)})
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(r, 1)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_recipe(bad)
    (tmp_path / "ds.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"ds.json:1: invalid JSON"):
        resolve_ds_config(recipe_from_dict({**BASE, "ds_config": str(tmp_path / "ds.json")}), 1)


def test_to_dict_round_trips():
    r = recipe_from_dict({**BASE, "reweight": {"scheme": "irdro", "lam": 0.5}})
    assert recipe_from_dict(r.to_dict()) == r


def test_validate_cli_rejects_typo_with_the_key(tmp_path):
    p = write(tmp_path, BASE)
    for folder in ("tok", "data/x"):  # BASE's paths, relative to the working directory
        (tmp_path / folder).mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "irdro.validate", str(p), "reweight.lamm=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "reweight.lamm" in out.stderr and "did you mean reweight.lam" in out.stderr
    assert "Traceback" not in out.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "irdro.validate", str(p), "--world-size", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"train_batch_size": 2' in ok.stdout


def test_trim_top_that_trims_nothing_is_refused(tmp_path):
    over = ["reweight.scheme=irdro", "reweight.trim_top=0.1", "micro_batch_size=4"]
    with pytest.raises(ConfigError, match=r"reweight.trim_top: floor\(0.1 x window 8\) = 0 trims nothing"):
        load_recipe(write(tmp_path, BASE), over, world_size=2)
    load_recipe(write(tmp_path, BASE), over, world_size=3)  # window 12: one sample trimmed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\]: must be in \[0, 1\)"),
        ("optim.betas=[-0.1, 0.9]", r"optim.betas\[0\]"),
        ("optim.eps=0", "optim.eps: must be a finite number > 0"),
        ("seed=-1", r"seed: must be in \[0, 2\*\*32\)"),
        ("eval.micro_batch_size=-2", "eval.micro_batch_size: must be >= 0"),
        ("eval.max_samples=0", "eval.max_samples: must be >= 1"),
        ("eval.max_batches=4", "unknown key eval.max_batches; did you mean eval.max_samples"),
        (
            "model.attention=flash_attention_2",
            "model.attention: flash_attention_2 needs a bf16 model",
        ),
    ],
)
def test_ranges_and_combinations_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, BASE), [override])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"gradient_predivide_factor": 2.0}, "gradient_predivide_factor=2.0"),
        ({"prescale_gradients": True}, "prescale_gradients=true"),
        (
            {"zero_optimization": {"reduce_scatter": False}},
            "zero_optimization.reduce_scatter=false",
        ),
        ({"bf16": {"check_grad_overflow": False}}, "bf16.check_grad_overflow=false"),
        (
            {"zero_optimization": {"compute_grad_norm": False}},
            "zero_optimization.compute_grad_norm=false",
        ),
        ({"sequence_parallel_size": 2}, "sequence_parallel_size=2"),
        ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal=true"),
        ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage=1 .* not covered"),
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage=0"),
    ],
)
def test_ds_settings_that_break_the_gradient_contract_are_refused(overrides, key):
    r = recipe_from_dict({**BASE, "ds_overrides": overrides})
    with pytest.raises(ConfigError, match=f"ds_config: .*{key}"):
        resolve_ds_config(r, 2)


def test_harmless_ds_settings_pass():
    ok = {
        "gradient_predivide_factor": 1.0,
        "prescale_gradients": False,
        "checkpoint": {"tag_validation": "Warn"},
        "zero_optimization": {"reduce_scatter": True},
    }
    assert resolve_ds_config(recipe_from_dict({**BASE, "ds_overrides": ok}), 2)["prescale_gradients"] is False


def test_bf16_with_grad_accum_accumulates_in_fp32():
    bf16 = {
        **BASE,
        "model": {**BASE["model"], "dtype": "bf16"},
        "ds_config": "ds_configs/zero3_bf16.json",
    }
    assert resolve_ds_config(recipe_from_dict({**bf16, "grad_accum_steps": 2}), 2)["data_types"] == {
        "grad_accum_dtype": "fp32"
    }
    assert "data_types" not in resolve_ds_config(recipe_from_dict(bf16), 2)  # GA 1: nothing to accumulate
    assert "data_types" not in resolve_ds_config(recipe_from_dict({**BASE, "grad_accum_steps": 2}), 2)  # fp32
    mine = {
        **bf16,
        "grad_accum_steps": 2,
        "ds_overrides": {"data_types": {"grad_accum_dtype": "bf16"}},
    }
    assert resolve_ds_config(recipe_from_dict(mine), 2)["data_types"]["grad_accum_dtype"] == "bf16"  # user's choice


# ----------------------------------------------------------------------------- tensor parallelism

TP_MODEL = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 64}


def test_tensor_parallel_owns_autotp_in_the_ds_json():
    r = recipe_from_dict({**BASE, "model": {**BASE["model"], "config": TP_MODEL}, "parallel": {"tensor_parallel": 2}})
    ds = resolve_ds_config(r, 4)  # DP 2 x TP 2
    assert ds["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": False}
    assert ds["train_batch_size"] == r.micro_batch_size * 2
    assert "tensor_parallel" not in resolve_ds_config(recipe_from_dict(BASE), 4)


@pytest.mark.parametrize("key", ["autotp_size", "vocab_parallel_lm_head", "tp"])
@pytest.mark.parametrize("tp", [1, 2])
def test_ds_json_that_sets_autotp_is_refused(key, tp):
    r = recipe_from_dict(
        {
            **BASE,
            "model": {**BASE["model"], "config": TP_MODEL},
            "parallel": {"tensor_parallel": tp},
            "ds_overrides": {"tensor_parallel": {key: 2}},
        }
    )
    with pytest.raises(
        ConfigError, match=rf"^ds_config: .* sets tensor_parallel.{key}, which irdro sets from parallel"
    ):
        resolve_ds_config(r, 2)


def test_autotp_with_zero3_needs_a_recent_deepspeed(monkeypatch):
    import irdro.config

    r = recipe_from_dict({**BASE, "model": {**BASE["model"], "config": TP_MODEL}, "parallel": {"tensor_parallel": 2}})
    monkeypatch.setattr(irdro.config, "installed_deepspeed_version", lambda: (0, 19, 3))
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel: AutoTP with ZeRO-3 needs deepspeed >= 0.19.4"):
        resolve_ds_config(r, 2)
    zero2 = recipe_from_dict({**BASE, "ds_config": "ds_configs/zero2_fp32.json", "parallel": {"tensor_parallel": 2}})
    assert resolve_ds_config(zero2, 2)["tensor_parallel"]["autotp_size"] == 2
    monkeypatch.setattr(irdro.config, "installed_deepspeed_version", lambda: (0, 19, 4))
    assert resolve_ds_config(r, 2)["tensor_parallel"]["autotp_size"] == 2


@pytest.mark.parametrize("key", ["num_attention_heads", "num_key_value_heads", "intermediate_size"])
def test_tensor_parallel_must_divide_heads_and_mlp(tmp_path, key):
    bad = {**TP_MODEL, key: 6}  # not a multiple of 4
    with pytest.raises(ConfigError, match=rf"^parallel.tensor_parallel: 4 does not divide {key}="):
        load_recipe(
            write(tmp_path, {**BASE, "model": {**BASE["model"], "config": bad}}), ["parallel.tensor_parallel=4"]
        )
    # the same check reads model.path's config.json
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    model = {"path": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match=r"config.json; pick a tensor_parallel"):
        load_recipe(write(tmp_path, {**BASE, "model": model}), ["parallel.tensor_parallel=4"])
    load_recipe(
        write(tmp_path, {**BASE, "model": {**BASE["model"], "config": TP_MODEL}}), ["parallel.tensor_parallel=4"]
    )

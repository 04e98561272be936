"""A checkpoint's trainer state is read without unpickling arbitrary objects (`--resume` on a crafted
checkpoint folder must not run its code), while every state the stages write still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit.train.checkpoint import STATE_FILE, latest_resumable, load_state


class _WritesAFile:
    """Unpickling this calls `Path.write_text`: what a crafted checkpoint would do with os.system."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def _checkpoint(root: Path, state: object) -> Path:
    folder = root / "checkpoints" / "step-2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    torch.save(state, folder / STATE_FILE)
    return folder


def test_a_state_with_a_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    target = tmp_path / "ran.txt"
    folder = _checkpoint(tmp_path, {"step": 2, "torch_rng": torch.get_rng_state(), "x": _WritesAFile(target)})
    assert latest_resumable(tmp_path / "checkpoints") == folder
    with pytest.raises(ValueError) as refused:
        load_state(folder)
    message = str(refused.value)
    assert str(folder / STATE_FILE) in message
    assert "pathlib.Path" in message and "--resume" in message
    assert not target.exists()


def test_a_state_that_is_not_a_torch_file_is_refused_with_its_name(tmp_path):
    folder = _checkpoint(tmp_path, {"step": 1})
    (folder / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(folder / STATE_FILE)):
        load_state(folder)


def test_what_the_stages_save_loads_back(tmp_path):
    """The kinds of values a trainer state holds: step and layout, RNG states, optimiser and schedule
    states, PPO's controllers (floats, a tuple, a dict), batch order (ints), absent parts (None)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    scheduler.step()
    state = {
        "step": 2, "layout": "whole", "torch_rng": torch.get_rng_state(),
        "gen": torch.Generator().get_state(),
        "torch_rng_per_process": [torch.get_rng_state()], "cuda_rng_per_process": [None],
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "controllers": {"kl_coef": 0.1, "reward_gain": 1.0, "reward_bias": 0.0, "moments": (0.0, 1.0, 3),
                        "extra": {}},
        "value_head": model.state_dict(), "critic": None, "batch_order": [3, 1, 2],
    }
    return_state = load_state(_checkpoint(tmp_path, state))
    assert return_state.keys() == state.keys()
    assert torch.equal(return_state["torch_rng"], state["torch_rng"])
    assert return_state["controllers"] == state["controllers"]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(return_state["optimizer"])


def test_deepspeed_optimiser_states_load_back(tmp_path):
    """ZeRO's optimiser state dicts hold its stage enum, loss scaler and fragment records."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    zero = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
            "dynamic": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
            "param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}], "ds_version": "0.19.8"}
    loaded = load_state(_checkpoint(tmp_path, {"step": 2, "layout": "deepspeed", "optimizer": [zero]}))
    saved = loaded["optimizer"][0]
    assert saved["zero_stage"] == ZeroStageEnum.gradients
    assert vars(saved["dynamic"]) == vars(zero["dynamic"])
    assert saved["param_slice_mappings"][0]["w"] == fragment_address(numel=3, start=0)

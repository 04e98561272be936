"""Two CPU processes (gloo) give SFT and reward-model losses equal to one process.

Each process takes its share of the global batch and the losses are normalised so that the
gradient averaged by DDP is the one-process gradient; only float summation order differs,
so the test allows 1e-5 (relative) on every logged loss, the second step's loss included
(it depends on the first update). Weights are not compared element-wise: Adam turns the
~1e-12 noise on gradients that should be zero (the pad embedding row) into steps of size lr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from rlhfkit.config import load_config
    from rlhfkit.train.rm import run_rm
    from rlhfkit.train.sft import run_sft

    init, out = Path(sys.argv[1]), Path(sys.argv[2])
    prompts = [f"Say a colour number {i}." for i in range(8)]
    config = load_config(overrides=["sft.batch_size=4", "sft.epochs=1", "rm.batch_size=4", "rm.epochs=1",
                                    "rm.val_share=0", "sft.warmup_ratio=0", "rm.warmup_ratio=0"])
    run_sft(config, init, [{"prompt": p, "completion": "red " * (i % 3 + 1)} for i, p in enumerate(prompts)],
            out / "sft", show_progress=False)
    run_rm(config, init, [{"prompt": p, "chosen": "red", "rejected": "blue " * (i % 2 + 1)}
                          for i, p in enumerate(prompts)], out / "rm", show_progress=False)
    from accelerate import PartialState
    state = PartialState()
    (out / f"rank{state.process_index}-of-{state.num_processes}").touch()
    """
)


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mp") / "init"
    tokenizer = train_tokenizer(["Say a colour number 3. red", "blue green red yellow"] * 40, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, folder)
    return folder


def _launch(n_processes: int, script: Path, init: Path, out: Path) -> None:
    # `--cpu` alone runs one process; the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU
    # starts n CPU processes that join a gloo group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if n_processes > 1 else "--cpu",
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(init),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(init_folder, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    for n in (1, 2):
        _launch(n, script, init_folder, tmp_path / f"p{n}")
    # Really two processes, each seeing the world size.
    assert sorted(p.name for p in (tmp_path / "p2").glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
    for stage in ("sft", "rm"):
        one, two = (
            _losses(tmp_path / "p1" / stage / "metrics.jsonl"),
            _losses(tmp_path / "p2" / stage / "metrics.jsonl"),
        )
        assert len(one) == len(two) >= 1
        for a, b in zip(one, two, strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, one, two)
        # Both runs trained (the losses are equal because both moved, not because neither did).
        w0 = load_file(str(init_folder / "model.safetensors"))
        w2 = load_file(str(tmp_path / "p2" / stage / "model" / "model.safetensors"))
        assert any(not torch.equal(w0[k], w2[k]) for k in w0 if k in w2)

"""Every training stage stops cleanly and resumes exactly (PPO's own tests are in test_ppo_train.py).

For each stage, on tiny models: an uninterrupted run; a run stopped by SIGTERM at a step (it saves a
checkpoint there and raises TrainingInterrupted), then resumed; a run that crashes at a step (no
chance to save), then resumed from its last periodic checkpoint, which drops the metrics logged
after it. Both resumed runs must end with the very bytes of the uninterrupted run's model and the
same metrics, and report where they resumed from.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.models.loading import load_reward_model, load_tokenizer, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.checkpoint import STATE_FILE, TrainingInterrupted, checkpoint_steps
from rlhfkit.train.loop import MetricsLog

ITEMS = ["Paris", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Berlin", "Madrid", "Athens", "Dublin"]
PROMPTS = [f"Give me the top 5 cities to visit number {i}." for i in range(12)]


def _answer(i: int, n: int = 5) -> str:
    return "\n".join(f"{k + 1}. {ITEMS[(i + k) % 10]}" for k in range(n))


DEMOS = [{"prompt": p, "completion": _answer(i)} for i, p in enumerate(PROMPTS)]
PAIRS = [{"prompt": p, "chosen": _answer(i), "rejected": _answer(i + 3, 3)} for i, p in enumerate(PROMPTS)]
CORPUS = [f"{p}\n{_answer(i)}" for i, p in enumerate(PROMPTS * 4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny causal LM and a reward model started from it, saved like RUN/sft/model and RUN/rm/model."""
    tokenizer = train_tokenizer(CORPUS + [p["rejected"] for p in PAIRS], vocab_size=300)
    root = tmp_path_factory.mktemp("models")
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, root / "sft")
    torch.manual_seed(0)
    reward_model = load_reward_model(root / "sft", tokenizer.pad_token_id)
    save_model(reward_model, load_tokenizer(root / "sft"), root / "rm")
    return root / "sft", root / "rm"


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _stopping_at(monkeypatch, step: int, crash: bool) -> None:
    """When the stage logs `step`: SIGTERM to this process (as Ctrl-C or a scheduler would), or a
    crash (an exception: nothing more is saved)."""
    original = MetricsLog.log

    def log(self, at: int, **row) -> None:
        original(self, at, **row)
        if at == step:
            if crash:
                raise RuntimeError(f"crash at step {step}")
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "log", log)


def _check_resumes_exactly(
    monkeypatch, tmp_path: Path, run: Callable[..., dict], stop_at: int, crash_at: int, saved_before: int
) -> None:
    """`run(out_dir, resume=...)` trains one stage in `out_dir` and returns its summary."""
    reference = tmp_path / "uninterrupted"
    done = run(reference)
    expected = (reference / "model" / "model.safetensors").read_bytes()
    expected_rows = _metrics(reference)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _stopping_at(patch, stop_at, crash=False)
        with pytest.raises(TrainingInterrupted) as info:
            run(stopped)
    assert info.value.step == stop_at
    assert (stopped / "checkpoints" / f"step-{stop_at}" / STATE_FILE).is_file()
    assert not (stopped / "model").exists()
    summary = run(stopped, resume=True)
    assert summary["resumed_from"] == stop_at
    assert (stopped / "model" / "model.safetensors").read_bytes() == expected
    assert _metrics(stopped) == expected_rows

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _stopping_at(patch, crash_at, crash=True)
        with pytest.raises(RuntimeError, match="crash at step"):
            run(crashed)
    assert [r["step"] for r in _metrics(crashed)][-1] == crash_at  # logged past the checkpoint
    summary = run(crashed, resume=True)
    assert summary["resumed_from"] == saved_before
    assert (crashed / "model" / "model.safetensors").read_bytes() == expected
    assert _metrics(crashed) == expected_rows
    # Only the newest checkpoint keeps its trainer state; older ones keep the weights.
    states = [p.name for _, p in checkpoint_steps(crashed / "checkpoints") if (p / STATE_FILE).is_file()]
    assert len(states) == 1
    assert done.get("resumed_from") is None


CRITIC_FREE = [
    "grpo.steps=5",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.minibatch=2",
    "grpo.max_new_tokens=6",
    "grpo.save_every=2",
    "rloo.steps=5",
    "rloo.prompts_per_step=2",
    "rloo.group_size=2",
    "rloo.minibatch=2",
    "rloo.max_new_tokens=6",
    "rloo.save_every=2",
]


@pytest.mark.parametrize("section", ["grpo", "rloo"])
def test_critic_free_stages_resume_exactly(models, monkeypatch, tmp_path, section):
    """GRPO and RLOO sample with the process's torch RNG (no per-prompt seeds here), so an exact
    continuation needs its state, the optimiser's, the schedule's and the prompt order's."""
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.rewards import build_reward_functions

    sft, rm = models
    config = load_config(overrides=CRITIC_FREE)
    terms = build_reward_functions(getattr(config, section).rewards, rm)

    def run(out: Path, resume: bool = False) -> dict:
        return run_critic_free(config, section, sft, terms, PROMPTS, out, show_progress=False, resume=resume)

    _check_resumes_exactly(monkeypatch, tmp_path, run, stop_at=3, crash_at=3, saved_before=2)


# Each stage's settings: (overrides, stop at, crash at, last periodic checkpoint before the crash).
# SFT logs every 5 steps and pretraining every 10, so they stop and crash at logged steps.
ONE_MODEL = {
    "pretrain": (
        [
            "model.vocab_size=300",
            "model.hidden_size=32",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.intermediate_size=64",
            "pretrain.steps=25",
            "pretrain.batch_size=2",
            "pretrain.block_size=16",
            "pretrain.warmup_steps=3",
            "pretrain.save_every=8",
        ],
        10,
        20,
        16,
    ),
    "sft": (["sft.epochs=2", "sft.batch_size=2", "sft.max_length=48", "sft.save_every=4"], 5, 10, 8),
    "rm": (
        ["rm.epochs=2", "rm.batch_size=2", "rm.max_length=48", "rm.val_share=0.2", "rm.save_every=2"],
        3,
        5,
        4,
    ),
    "dpo": (["dpo.epochs=1", "dpo.batch_size=2", "dpo.max_length=48", "dpo.save_every=2"], 3, 5, 4),
    "ipo": (
        [
            "dpo.loss_type=ipo",
            "dpo.precompute_reference=false",
            "dpo.epochs=1",
            "dpo.batch_size=2",
            "dpo.max_length=48",
            "dpo.save_every=2",
        ],
        3,
        5,
        4,
    ),
    "kto": (["kto.epochs=1", "kto.batch_size=4", "kto.max_length=48", "kto.save_every=2"], 3, 5, 4),
}
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8"]


def _one_model_run(stage: str, overrides: list[str], models: tuple[Path, Path]) -> Callable[..., dict]:
    sft, _ = models
    config = load_config(overrides=overrides)
    if stage == "pretrain":
        from rlhfkit.train.pretrain import run_pretrain

        return lambda out, resume=False: run_pretrain(config, CORPUS, out, False, resume=resume)
    if stage == "sft":
        from rlhfkit.train.sft import run_sft

        return lambda out, resume=False: run_sft(config, sft, DEMOS, out, False, resume=resume)
    if stage == "rm":
        from rlhfkit.train.rm import run_rm

        return lambda out, resume=False: run_rm(config, sft, PAIRS, out, False, resume=resume)
    if stage == "kto":
        from rlhfkit.train.kto import run_kto, unpaired_from_pairs

        examples = unpaired_from_pairs(PAIRS)
        return lambda out, resume=False: run_kto(config, sft, examples, out, False, resume=resume)
    from rlhfkit.train.dpo import run_dpo

    return lambda out, resume=False: run_dpo(config, sft, PAIRS, out, False, resume=resume)


@pytest.mark.parametrize("stage", list(ONE_MODEL))
def test_one_model_stages_resume_exactly(models, monkeypatch, tmp_path, stage):
    """Pretraining, SFT, the reward model, DPO, IPO (live reference) and KTO: the checkpoint holds the
    weights (pretraining: the tokenizer too), the optimiser, the schedule and the data order."""
    overrides, stop_at, crash_at, saved_before = ONE_MODEL[stage]
    run = _one_model_run(stage, overrides, models)
    _check_resumes_exactly(monkeypatch, tmp_path, run, stop_at, crash_at, saved_before)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_lora_stages_resume_onto_the_original_base(models, monkeypatch, tmp_path, stage):
    """Under LoRA a checkpoint's model folder is the merged model; a resumed run loads the base from
    the starting model and only the adapter from the checkpoint (else the base would hold the update
    twice, and DPO's adapter-off reference would be the trained policy)."""
    overrides, stop_at, crash_at, saved_before = ONE_MODEL[stage]
    run = _one_model_run(stage, [*overrides, *LORA], models)
    _check_resumes_exactly(monkeypatch, tmp_path, run, stop_at, crash_at, saved_before)


def test_resume_refuses_another_config_and_starts_over_without_checkpoints(models, tmp_path, capsys):
    """A checkpoint made with another config is refused; --resume with none starts from step 0."""
    from rlhfkit.train.sft import run_sft

    sft, _ = models
    overrides = ONE_MODEL["sft"][0]
    out = tmp_path / "sft"
    fresh = run_sft(load_config(overrides=overrides), sft, DEMOS, out, False, resume=True, fingerprint="a")
    assert fresh["resumed_from"] is None
    assert "no checkpoint" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different config"):
        run_sft(load_config(overrides=overrides), sft, DEMOS, out, False, resume=True, fingerprint="b")
    again = run_sft(load_config(overrides=overrides), sft, DEMOS, out, False, resume=True, fingerprint="a")
    # The newest checkpoint is step 8 of 12: none is written at the last step, the model is saved then.
    assert again["resumed_from"] == 8
    assert [path.name for _, path in checkpoint_steps(out / "checkpoints")] == ["step-4", "step-8"]


def test_the_demo_and_the_loop_start_a_changed_stage_over_and_resume_refuses(tmp_path):
    """`rlhfkit demo` and `rlhfkit loop` resume by themselves: a stage whose checkpoints were made with
    another config starts over there. `rlhfkit <stage> --resume` refuses them instead."""
    from rlhfkit.pipeline import Run

    config = load_config(overrides=["sft.epochs=3"])
    auto = Run(tmp_path, config, show_progress=False, resume=True, restart_changed=True)
    strict = Run(tmp_path, config, show_progress=False, resume=True)
    # Nothing to continue: the demo starts quietly; --resume goes on to say it found no checkpoint.
    assert not auto.checkpointing("sft")["resume"] and strict.checkpointing("sft")["resume"]
    checkpoints = auto.stage_dir("sft") / "checkpoints"
    (checkpoints / "step-4").mkdir(parents=True)
    for name in ("config.json", STATE_FILE):
        (checkpoints / "step-4" / name).write_text("{}")
    (checkpoints / "fingerprint.json").write_text(json.dumps({"fingerprint": auto.fingerprint("sft")}))
    assert auto.checkpointing("sft")["resume"] and strict.checkpointing("sft")["resume"]
    (checkpoints / "fingerprint.json").write_text(json.dumps({"fingerprint": "another config"}))
    assert not auto.checkpointing("sft")["resume"]
    assert strict.checkpointing("sft") == {"resume": True, "fingerprint": strict.fingerprint("sft")}
    # How often a stage saves does not change what it computes: not part of its fingerprint.
    every = Run(tmp_path, load_config(overrides=["sft.epochs=3", "sft.save_every=7"]), show_progress=False)
    assert every.fingerprint("sft") == auto.fingerprint("sft")


def test_checkpoints_restore_the_cuda_rng(models, monkeypatch, tmp_path):
    """On a GPU the HF rollout samples from the CUDA generator (`sample_categorical` draws on the
    logits' device): a checkpoint keeps its state and a resume puts it back, as for the CPU generator
    (set_seed alone would restart the CUDA stream, and the resumed run would sample other responses).
    No GPU here: torch.cuda's RNG functions are stood in for by one recorded state."""
    from types import SimpleNamespace

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.train.checkpoint import StageCheckpoints, StopFlag
    from rlhfkit.train.loop import make_accelerator

    sft, _ = models
    model, tokenizer = load_causal_lm(sft), load_tokenizer(sft)
    accelerator = make_accelerator(0)
    settings = SimpleNamespace(save_every=1, keep_states=1)
    cuda = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda["state"].clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": cuda.update(state=state.clone())
    )

    ckpt = StageCheckpoints("sft", tmp_path, accelerator, settings)
    log = ckpt.begin(0, tmp_path / "metrics.jsonl")
    ckpt.after_step(1, 3, StopFlag(), log, lambda: (model, tokenizer, None, {}))
    log.close()
    cuda["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the run went on sampling, then died
    resumed = StageCheckpoints("sft", tmp_path, accelerator, settings, resume=True)
    assert resumed.start_step == 1
    resumed.begin(0, tmp_path / "metrics.jsonl").close()
    assert cuda["state"].tolist() == [1, 2, 3]

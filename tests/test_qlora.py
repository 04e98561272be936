"""QLoRA (`lora.quantize`): a bitsandbytes-quantized base under LoRA adapters, on the CPU.

The config checks run everywhere. The rest quantizes for real (bitsandbytes' CPU backend runs
4-bit and 8-bit layers) and is skipped, with the reason, where bitsandbytes is not installed;
the dev extra installs it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.config import ConfigError, LoRAConfig, RolloutConfig, load_config
from rlhfkit.models.loading import ADAPTER_DIR, load_tokenizer, load_trainable, save_model, tiny_causal_lm
from rlhfkit.models.lora import count_parameters, is_quantized, merged_copy, quantization_config
from rlhfkit.models.memory import held_model
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.logprobs import response_logprobs

needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'rlhfkit[qlora]'): real quantization not tested",
)

TEXTS = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 40
PROMPTS = [f"Say a colour number {i}." for i in range(8)]
QLORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.quantize=4bit"]


def test_quantize_needs_lora_enabled():
    with pytest.raises(ConfigError, match=r"lora.quantize=4bit needs lora.enabled=true"):
        load_config(overrides=["lora.quantize=4bit"])
    with pytest.raises(ConfigError, match=r"lora.quant_type"):
        load_config(overrides=["lora.enabled=true", "lora.quant_type=int3"])


def test_quantize_without_bitsandbytes_names_the_extra(monkeypatch):
    # None in sys.modules is how Python marks a module as not importable; find_spec then says None.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"lora.quantize=8bit needs bitsandbytes.*rlhfkit\[qlora\]"):
        load_config(overrides=["lora.enabled=true", "lora.quantize=8bit"])
    # Off, nothing is asked of the environment.
    assert load_config(overrides=["lora.enabled=true"]).lora.quantize is None


def test_quantization_settings():
    # model_construct: the settings alone, without asking whether bitsandbytes is installed.
    cfg = LoRAConfig.model_construct(enabled=True, quantize="4bit", quant_type="nf4", double_quant=True)
    q = quantization_config(cfg, "bfloat16")
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    # 4-bit layers compute in model.dtype.
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    cfg = LoRAConfig.model_construct(enabled=True, quantize="4bit", quant_type="fp4", double_quant=False)
    q = quantization_config(cfg, "float32")
    assert q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32
    eight = quantization_config(LoRAConfig.model_construct(enabled=True, quantize="8bit"), "float32")
    assert eight.load_in_8bit and not eight.load_in_4bit
    with pytest.raises(ValueError, match="lora.quantize"):
        quantization_config(LoRAConfig(), "float32")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init Llama and GPT-2 (Conv1D layers) checkpoints, and a reward model."""
    root = tmp_path_factory.mktemp("qlora")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    out = {}
    for arch in ("llama", "gpt2"):
        model = tiny_causal_lm(
            tokenizer, arch, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128
        )
        save_model(model, tokenizer, root / arch)
        out[arch] = root / arch
    return out


def _with_random_adapter(model: torch.nn.Module) -> torch.nn.Module:
    # peft starts B at zero (the adapter is a no-op); give it weights so the merge has work to do.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


@needs_bitsandbytes
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_4bit_base_trains_adapters_only_and_saves_a_plain_float_model(folders, arch, tmp_path):
    import bitsandbytes as bnb

    config = load_config(overrides=QLORA)
    model = load_trainable(folders[arch], config)
    assert is_quantized(model)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == (2 * 7 if arch == "llama" else 2 * 4)  # every linear layer of 2 blocks
    # Only the adapters train; nothing quantized has a gradient.
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # The memory estimate counts the base's real parameters, at half a byte each.
    float_model = AutoModelForCausalLM.from_pretrained(folders[arch])
    held = held_model("policy", model, reads_vocab=True)
    assert held.n_params == count_parameters(float_model)[0] + held.n_trainable
    assert held.weight_bytes < 4 * held.n_params / 2

    model = _with_random_adapter(model)
    ids = torch.tensor([[5, 9, 12, 7, 30, 31, 40, 41]])
    mask = torch.ones_like(ids)
    adapted = response_logprobs(model, ids, mask, 4)
    merged = merged_copy(model)
    assert is_quantized(model) and not is_quantized(merged)
    # Dequantized base + update is the function the adapters ran on (float rounding only).
    assert torch.allclose(response_logprobs(merged, ids, mask, 4), adapted, atol=1e-4)
    tokenizer = load_tokenizer(folders[arch])
    save_model(model, tokenizer, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert (tmp_path / "saved" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    # Plain transformers, no bitsandbytes layer: the same architecture as the float checkpoint.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in float_model.modules()]
    assert torch.allclose(response_logprobs(reloaded, ids, mask, 4), adapted, atol=1e-4)
    # The adapter's update survived the merge (peft's own merge would re-quantize it away).
    base = response_logprobs(float_model.eval(), ids, mask, 4)
    assert (response_logprobs(reloaded, ids, mask, 4) - base).abs().max() > 0.1
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


@needs_bitsandbytes
def test_8bit_reward_model_keeps_a_float_head_and_saves_plain(folders, tmp_path):
    import bitsandbytes as bnb

    config = load_config(overrides=[*QLORA, "lora.quantize=8bit"])
    tokenizer = load_tokenizer(folders["llama"])
    model = load_trainable(folders["llama"], config, "reward", tokenizer.pad_token_id)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 2 * 7
    # The new scalar head is not quantized and trains fully (peft's modules_to_save).
    assert any("score" in name and p.requires_grad for name, p in model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)
    model = _with_random_adapter(model)
    ids = torch.tensor([[5, 9, 12, 7, 30, 31]])
    score = model(input_ids=ids).logits
    save_model(model, tokenizer, tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in reloaded.modules())
    # Int8 matmuls (float16 activations, outlier split) against float ones: close, not equal.
    assert torch.allclose(reloaded(input_ids=ids).logits, score, atol=0.1)


@needs_bitsandbytes
def test_qlora_sft_and_ppo_end_to_end(folders, tmp_path):
    from rlhfkit.train.ppo import run_ppo
    from rlhfkit.train.sft import run_sft

    common = [
        "sft.batch_size=4",
        "sft.epochs=10",
        "sft.lr=1e-2",
        "sft.warmup_ratio=0",
        "ppo.steps=2",
        "ppo.rollout_batch=4",
        "ppo.minibatch=2",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=5",
        "ppo.lr=1e-3",
    ]
    config = load_config(overrides=QLORA + common)
    demos = [{"prompt": p, "completion": "red blue red"} for p in PROMPTS]
    curves = {}
    for name, cfg in {"qlora": config, "lora": load_config(overrides=QLORA[:-1] + common)}.items():
        run_sft(cfg, folders["llama"], demos, tmp_path / name, False)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(x)["loss"] for x in lines]
    # QLoRA learns, and as float LoRA does on the same data (measured: within 0.011 at each step).
    assert len(curves["qlora"]) == 4 and curves["qlora"][-1] < curves["qlora"][0] - 0.4, curves
    assert all(abs(a - b) < 0.05 for a, b in zip(curves["qlora"], curves["lora"], strict=True)), curves
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "qlora" / "model") is not None

    tokenizer = load_tokenizer(folders["llama"])
    from rlhfkit.models.loading import load_reward_model

    save_model(load_reward_model(folders["llama"], tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    run_ppo(config, tmp_path / "qlora" / "model", tmp_path / "rm", PROMPTS, tmp_path / "ppo", False)
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The adapter trained (peft starts B at zero) and the reference (adapter off) is the base.
    adapter = load_file(str(tmp_path / "ppo" / "model" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    assert abs(rows[0]["kl"]) < 1e-5  # the first rollout comes from the reference's own weights
    # Plain transformers loads and generates it (it may stop early: SFT taught it to end with EOS).
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model").generate(
        torch.tensor([[5, 9, 12]]), max_new_tokens=3, do_sample=False
    )
    assert out.shape[0] == 1 and 3 < out.shape[1] <= 6


@needs_bitsandbytes
def test_vllm_backend_refuses_a_quantized_policy(folders):
    from rlhfkit.rollout.vllm import VLLMSampler

    model = load_trainable(folders["llama"], load_config(overrides=QLORA))
    with pytest.raises(ConfigError, match="lora.quantize"):
        VLLMSampler(RolloutConfig(backend="vllm"), model, load_tokenizer(folders["llama"]))


@needs_bitsandbytes
def test_qlora_kto_reference_is_the_quantized_base(folders, tmp_path):
    from rlhfkit.train.kto import run_kto

    thumbs = [
        {"prompt": p, "completion": ("red " if i % 2 else "blue ") * (i % 3 + 1), "label": i % 2 == 1}
        for i, p in enumerate(PROMPTS)
    ]
    kto = ["kto.batch_size=4", "kto.epochs=2", "kto.lr=2e-2", "kto.warmup_ratio=0"]
    runs = {
        "full": kto,
        "qlora": QLORA + kto,
        "qlora-live": QLORA + kto + ["kto.precompute_reference=false"],
    }
    curves = {}
    for name, overrides in runs.items():
        run_kto(load_config(overrides=overrides), folders["llama"], thumbs, tmp_path / name, False)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(x) for x in lines]
    qlora = curves["qlora"]
    # Step 1: B = 0, so the policy is its reference (the quantized base, adapter off): r = 0, z0 = 0,
    # the full-weight run's numbers (measured equal, checked to 1e-6).
    assert qlora[0] == pytest.approx(curves["full"][0], abs=1e-6)
    assert qlora[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    # The live reference stays the quantized base while the adapter trains (measured equal).
    assert len(qlora) == 4 and all(
        live == pytest.approx(pre, abs=1e-6) for live, pre in zip(curves["qlora-live"], qlora, strict=True)
    )
    assert qlora[-1]["reward/desirable"] > qlora[-1]["reward/undesirable"]
    adapter = load_file(str(tmp_path / "qlora" / "model" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    # Saved as a plain float checkpoint, moved away from the base.
    assert "quantization_config" not in json.loads((tmp_path / "qlora" / "model" / "config.json").read_text())
    before = AutoModelForCausalLM.from_pretrained(folders["llama"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "qlora" / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

"""Tests for rlhfkit.eval.report: the HTML report and the CLI summary table."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from rlhfkit.eval.report import read_metrics, summary_table, write_html_report

IMG = '<img src="data:image/png;base64,'
XSS = "<script>alert(1)</script>"


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _full_report() -> dict:
    return {
        "task": "top5",
        "seed": 7,
        "wall_seconds": 312.5,
        "stages": {
            "pretrain": {"wall_seconds": 120.0, "tokens": 50000},
            "sft": {"wall_seconds": 40.0},
            "rm": {"wall_seconds": 30.0},
            "ppo": {"wall_seconds": 122.5},
        },
        "rm": {
            "heldout_accuracy": 0.8125,
            "gold_agreement": 0.7731,
            "n_train_pairs": 1200,
            "probes": {"duplicate_item": {"n": 240, "reward_model": 0.5583, "policy_loglik": 0.5375}},
        },
        "eval": {
            "policies": {
                "sft": {"gold_reward": 0.4123, "proxy_reward": 0.1, "kl_from_sft": 0.0},
                "ppo": {"gold_reward": 0.6877, "proxy_reward": 1.9, "kl_from_sft": 3.25},
                "dpo": {"gold_reward": 0.5511, "proxy_reward": 0.9, "kl_from_sft": 1.5},
            },
            "win_rate_vs_sft": {
                "ppo": {"rate": 0.7134, "ci95": [0.6612, 0.7656], "n": 300},
                "dpo": {"rate": 0.5833, "ci95": [0.5249, 0.6417], "n": 300},
            },
        },
        "feedback": {
            "n_labels": 900,
            "n_annotators": 12,
            "agreement_alpha": 0.41,
            "n_spammers_flagged": 2,
        },
        "samples": [
            {
                "prompt": "Top 5 houseplants for beginners?",
                "outputs": {
                    "sft": {"text": "1. Pothos\n2. Snake plant", "gold": 0.4, "proxy": 0.2},
                    "ppo": {"text": f"1. Pothos {XSS}\n2. ZZ plant", "gold": 0.9, "proxy": None},
                },
            }
        ],
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for stage in ("pretrain", "sft", "rm"):
        _write_metrics(
            run / stage / "metrics.jsonl",
            [{"step": s, "loss": 3.0 / (s + 1), "lr": 1e-3} for s in range(30)],
        )
    _write_metrics(
        run / "ppo" / "metrics.jsonl",
        [
            {
                "step": s,
                "loss/policy": math.sin(s),
                "kl": 0.05 * s,
                "reward/gold": 0.4 + 0.01 * s,
                "reward/score": 0.1 * s,
                "note": "text is skipped",
            }
            for s in range(50)
        ],
    )
    return run


def test_read_metrics(tmp_path: Path):
    assert read_metrics(tmp_path / "missing.jsonl") == []
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 1.5}\n\n{"step": 1, "loss": 1.2}\n', encoding="utf-8")
    assert read_metrics(path) == [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 1.2}]


def test_read_metrics_broken_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_metrics(path)


def test_full_report(run_dir: Path):
    out = write_html_report(run_dir, _full_report())
    assert out == run_dir / "report.html"
    html = out.read_text(encoding="utf-8")
    # 4 stage curve panels + the policy bar chart.
    assert html.count(IMG) >= 5
    for text in ("sft", "ppo", "dpo", "0.71 [0.66, 0.77]", "0.58 [0.52, 0.64]", "0.6877"):
        assert text in html
    assert "0.8125" in html and "1200" in html and "n_spammers_flagged" in html
    # The probe table: one row per defect with both columns, not a JSON dump among the scalars.
    assert 'id="probes"' in html and "duplicate_item" in html and "0.5583" in html and "0.5375" in html
    assert '"duplicate_item"' not in html
    assert "top5" in html and "312.5 s" in html
    # Newlines in outputs survive as text and render through white-space: pre-wrap.
    assert "1. Pothos\n2. Snake plant" in html and "pre-wrap" in html
    # Self-contained: no external fetches of any kind.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<link" not in html


def test_untrusted_output_is_escaped(run_dir: Path):
    html = write_html_report(run_dir, _full_report()).read_text(encoding="utf-8")
    assert XSS not in html
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_untrusted_names_and_prompts_are_escaped(tmp_path: Path):
    report = {
        "eval": {"policies": {XSS: {"gold_reward": 1.0}}},
        "samples": [{"prompt": XSS, "outputs": {XSS: {"text": XSS}}}],
    }
    html = write_html_report(tmp_path, report).read_text(encoding="utf-8")
    assert "<script" not in html


def test_missing_sections_do_not_crash(tmp_path: Path):
    html = write_html_report(tmp_path / "empty", {}).read_text(encoding="utf-8")
    assert "<html" in html and IMG not in html
    partial = {
        "task": "top5",
        "stages": {"sft": {}},
        "eval": {"policies": {"sft": {"gold_reward": None}}},
        "samples": [{"prompt": "p", "outputs": {"sft": {"text": "x"}, "ppo": None}}],
    }
    html = write_html_report(tmp_path / "partial", partial).read_text(encoding="utf-8")
    assert "top5" in html


def test_other_stage_folders_are_plotted(tmp_path: Path):
    _write_metrics(tmp_path / "dpo" / "metrics.jsonl", [{"step": 0, "loss": 1.0}])
    (tmp_path / "nometrics").mkdir()
    html = write_html_report(tmp_path, {}).read_text(encoding="utf-8")
    assert html.count(IMG) == 1 and "dpo training curves" in html


def test_summary_table():
    console = Console(record=True, width=140)
    console.print(summary_table(_full_report()))
    text = console.export_text()
    for expected in ("sft", "ppo", "dpo", "0.688", "1.900", "3.250", "0.71 [0.66, 0.77]"):
        assert expected in text
    sft_row = next(line for line in text.splitlines() if line.lstrip("│| ").startswith("sft "))
    assert sft_row.rstrip(" │|").endswith("-")


def test_summary_table_without_eval():
    console = Console(record=True)
    console.print(summary_table({}))
    assert "policy" in console.export_text()


def test_malformed_sections_are_skipped(tmp_path: Path):
    report = {
        "stages": {"sft": 12.0},
        "rm": None,
        "eval": {"policies": {"sft": None}, "win_rate_vs_sft": {"ppo": None}},
        "samples": [{"prompt": "p", "outputs": {"sft": "plain text output", "ppo": None}}],
    }
    html = write_html_report(tmp_path, report).read_text(encoding="utf-8")
    assert "plain text output" in html
    console = Console(record=True)
    console.print(summary_table(report))
    assert "sft" in console.export_text()


def test_overopt_and_bench_sections(tmp_path: Path):
    from rlhfkit.eval.overopt import bon_sweep
    from rlhfkit.eval.rm_bench import benchmark_report

    x = np.random.default_rng(0).normal(size=(10, 16))
    report = {
        "task": "top5",
        "overopt": {"bon": bon_sweep({"rm": x.tolist()}, (x - 0.5 * x**2).tolist())},
        "rm": {
            "heldout_accuracy": 0.5,
            "bench": benchmark_report([1.0, -1.0], [["topic seen"], ["topic unseen"]]),
        },
    }
    html = write_html_report(tmp_path, report).read_text()
    assert 'id="overopt"' in html and 'id="overopt-fits"' in html
    assert "Benchmark on gold-labelled held-out pairs" in html and "topic unseen" in html
    # Over-optimisation plot and reliability diagram; the nested bench is not dumped as JSON.
    assert html.count(IMG) == 2
    assert '"calibration"' not in html


def _curve_point(fraction: float, n_labels: int, accuracy: float | None) -> dict:
    return {
        "fraction": fraction,
        "n_items": n_labels // 2,
        "n_labels": n_labels,
        "n_pairs": n_labels // 3,
        "n_train_pairs": n_labels // 4,
        "heldout_accuracy": accuracy,
    }


def test_label_efficiency_curve(tmp_path: Path):
    curve = [_curve_point(0.25, 248, 0.6125), _curve_point(0.5, 496, 0.6875), _curve_point(1.0, 986, 0.7436)]
    report = {"rm": {"heldout_accuracy": 0.7436, "label_curve": curve}}
    html = write_html_report(tmp_path, report).read_text()
    table = html[
        html.index('id="label-curve-table"') : html.index("</table>", html.index('id="label-curve-table"'))
    ]
    for text in ("0.25", "248", "124", "82", "62", "0.6125", "0.6875", "986", "0.7436"):
        assert f'<td class="num">{text}</td>' in table
    assert (
        html.count(IMG) == 1 and 'alt="reward-model held-out accuracy against the number of labels"' in html
    )
    # The points are a table of their own, not a JSON blob in the reward-model table.
    assert '"n_train_pairs"' not in html and "<th>label_curve</th>" not in html
    # A share too small to give pairs has no accuracy: a row with '-', and no curve from one point.
    sparse = [_curve_point(0.1, 20, None), _curve_point(1.0, 200, 0.7)]
    html = write_html_report(tmp_path, {"rm": {"label_curve": sparse}}).read_text()
    assert 'id="label-curve-table"' in html and IMG not in html


def test_label_efficiency_across_loop_rounds(tmp_path: Path):
    from rlhfkit.loop import ROUND_KEYS

    rounds = [
        {
            **dict.fromkeys(ROUND_KEYS),
            "round": k,
            "n_labels_total": 300 * k,
            "rm_heldout_accuracy": acc,
            "win_rate_vs_sft": {"rate": 0.6, "ci95": [0.5, 0.7], "n": 40},
        }
        for k, acc in ((1, 0.7), (2, 0.74), (3, 0.77))
    ]
    html = write_html_report(tmp_path, {"loop": {"rounds": rounds}}).read_text()
    assert 'alt="reward-model held-out accuracy against the labels so far, per round"' in html
    assert html.count(IMG) == 2  # gold reward and win rate per round, and the curve
    # Without RM accuracies (no gold judge) there is no curve.
    for r in rounds:
        r["rm_heldout_accuracy"] = None
    html = write_html_report(tmp_path, {"loop": {"rounds": rounds}}).read_text()
    assert "labels so far, per round" not in html and html.count(IMG) == 1


def test_loop_rounds_name_their_judge_escaped(tmp_path: Path):
    from rlhfkit.loop import ROUND_KEYS

    rounds = [
        {**dict.fromkeys(ROUND_KEYS), "round": 1, "judge": "gold"},
        {**dict.fromkeys(ROUND_KEYS), "round": 2, "judge": "llm", "judge_model": "judges/<small>"},
    ]
    html = write_html_report(tmp_path, {"loop": {"rounds": rounds}}).read_text()
    assert "<th>judge</th>" in html
    assert "<td>gold</td>" in html and "<td>llm (judges/&lt;small&gt;)</td>" in html


def test_win_rate_against_another_reference(tmp_path: Path):
    report = {
        "eval": {
            "reference": "ppo",
            "judge": "rm",
            "policies": {"ppo": {"gold_reward": 0.5}, "dpo": {"gold_reward": 0.6}},
            "win_rate_vs_ppo": {"dpo": {"rate": 0.61, "ci95": [0.5, 0.7], "n": 80}},
        }
    }
    html = write_html_report(tmp_path, report).read_text()
    assert "win rate vs ppo [95% CI]" in html and "0.61 [0.50, 0.70]" in html
    assert "judged by the <b>rm</b> judge" in html


def test_the_judge_model_is_named_and_escaped(tmp_path: Path):
    # "llm" alone does not say which LLM judged; the report names the model (escaped).
    report = {
        "eval": {
            "reference": "sft",
            "judge": "llm",
            "judge_model": "models/<judge>",
            "policies": {"sft": {}, "ppo": {}},
            "win_rate_vs_sft": {"ppo": {"rate": 0.6, "ci95": [0.5, 0.7], "n": 80}},
        }
    }
    html = write_html_report(tmp_path, report).read_text()
    assert "judged by the <b>llm</b> judge (models/&lt;judge&gt;);" in html


def test_metrics_log_writes_tensorboard_events(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.train.loop import MetricsLog

    log = MetricsLog(tmp_path / "sft" / "metrics.jsonl")
    log.log(1, loss=2.0)
    log.log(2, loss=1.5, kl=float("nan"))
    log.close()
    assert read_metrics(tmp_path / "sft" / "metrics.jsonl")[1] == {"step": 2, "loss": 1.5, "kl": None}
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5)]
    # A NaN is a gap in metrics.jsonl and absent from TensorBoard, never a fake number.
    assert "kl" not in events.Tags()["scalars"]


def test_training_curve_note_names_the_smoothing_drawn(run_dir: Path):
    # _moving_average is centred (the smooth line must not lag the raw one): the note says so.
    html = write_html_report(run_dir, _full_report()).read_text()
    assert "centred moving average" in html and "trailing" not in html


def test_kl_column_is_from_the_reference(tmp_path: Path):
    # evaluate_policies writes kl_from_<reference>: with --reference ppo there is no kl_from_sft.
    report = {
        "eval": {
            "reference": "ppo",
            "policies": {
                "ppo": {"gold_reward": 0.5, "kl_from_ppo": 0.0},
                "dpo": {"gold_reward": 0.6, "kl_from_ppo": 1.234},
            },
            "win_rate_vs_ppo": {"dpo": {"rate": 0.61, "ci95": [0.5, 0.7], "n": 80}},
        }
    }
    html = write_html_report(tmp_path, report).read_text()
    assert "<th>KL from ppo</th>" in html and '<td class="num">1.234</td>' in html
    assert "<th>kl_from_ppo</th>" not in html  # one KL column, not a second one among the extras
    console = Console(record=True, width=140)
    console.print(summary_table(report))
    text = console.export_text()
    assert "KL from ppo" in text
    dpo_row = next(line for line in text.splitlines() if line.lstrip("│| ").startswith("dpo "))
    assert "1.234" in dpo_row


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_report_json_is_strict_json_and_sections_are_owned_by_their_stage(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import Run, _report_patch

    run = Run(tmp_path, load_config(None, []), show_progress=False)
    first_eval = {
        "wall_seconds": 1.0,
        "eval": {"reference": "sft", "win_rate_vs_sft": {"ppo": {"rate": 0.6}}},
        "samples": [{"prompt": "p"}],
        "rm": {"heldout_accuracy": 0.7, "probes": {"off_topic_item": {}}},
    }
    run.update_report(
        *_report_patch(run, "rm", {"wall_seconds": 1.0, "n_train_pairs": 9, "val_accuracy": 0.5})
    )
    run.update_report(*_report_patch(run, "eval", first_eval))
    # Again with another reference and no held-out pairs: nothing of the first eval may remain.
    second_eval = {
        "wall_seconds": 2.0,
        "eval": {"reference": "ppo", "win_rate_vs_ppo": {}},
        "samples": [],
        "rm": {},
    }
    run.update_report(*_report_patch(run, "eval", second_eval))
    report = _strict((tmp_path / "report.json").read_text())
    assert report["eval"] == {"reference": "ppo", "win_rate_vs_ppo": {}}
    assert report["rm"] == {"n_train_pairs": 9, "val_accuracy": 0.5}
    # A reward model trained again drops the figures the eval measured on the previous one.
    run.update_report(*_report_patch(run, "eval", first_eval))
    run.update_report(
        *_report_patch(run, "rm", {"wall_seconds": 1.0, "n_train_pairs": 7, "val_accuracy": math.nan})
    )
    report = _strict((tmp_path / "report.json").read_text())
    assert report["rm"] == {"n_train_pairs": 7, "val_accuracy": None}
    assert report["stages"]["rm"]["val_accuracy"] is None and report["wall_seconds"] == 2.0


def test_strict_json_writes_non_finite_numbers_as_null():
    from rlhfkit.data.io import strict_json

    value = {"a": [1.0, math.nan, (math.inf, -math.inf)], "b": {"c": "NaN", "d": 3}}
    assert strict_json(value) == {"a": [1.0, None, [None, None]], "b": {"c": "NaN", "d": 3}}


def test_loop_plot_of_rounds_without_rewards_says_so(recwarn):
    """A task without a gold judge whose rounds recorded no proxy reward: the reward panel says there
    is nothing to show, and matplotlib warns of no empty legend."""
    import base64

    from rlhfkit.eval.report import loop_rounds_png

    rounds = [{"round": k, "win_rate_vs_sft": {"rate": 0.6, "ci95": [0.5, 0.7]}} for k in (1, 2)]
    png = loop_rounds_png(rounds)
    assert png is not None and base64.b64decode(png).startswith(b"\x89PNG")
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_heldout_accuracy_not_measured_reads_so_with_its_reason(tmp_path: Path):
    # eval.heldout_pairs=0: report.json's rm.heldout_accuracy is null, with the reason beside it.
    report = {
        "rm": {
            "heldout_accuracy": None,
            "heldout_accuracy_reason": "eval.heldout_pairs is 0",
            "gold_agreement": 0.71,
            "n_train_pairs": 40,
        }
    }
    html = write_html_report(tmp_path, report).read_text()
    assert '<th>heldout_accuracy</th><td class="num">not measured (eval.heldout_pairs is 0)</td>' in html
    assert "<th>heldout_accuracy_reason</th>" not in html and "0.71" in html
    # An rm section from before the key existed (or before any eval): not measured, no reason.
    html = write_html_report(tmp_path, {"rm": {"n_train_pairs": 40}}).read_text()
    assert '<th>heldout_accuracy</th><td class="num">not measured</td>' in html
    # A measured accuracy is shown as it is.
    html = write_html_report(tmp_path, {"rm": {"heldout_accuracy": 0.75}}).read_text()
    assert '<th>heldout_accuracy</th><td class="num">0.75</td>' in html and "not measured" not in html

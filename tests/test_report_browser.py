"""report.html in a real browser: no console errors, every plot decoded, a screenshot to look at."""

import json
from pathlib import Path

import numpy as np
import pytest

from rlhfkit.eval.overopt import bon_sweep, rl_sweep
from rlhfkit.eval.report import write_html_report
from rlhfkit.eval.rm_bench import benchmark_report
from rlhfkit.eval.winrate import win_rate

pytestmark = pytest.mark.browser
XSS = "<script>console.error('injected')</script><img src=x onerror=\"console.error('img')\">"


def _synthetic_run(run: Path) -> dict:
    """A run directory with curves of three stages and a report with every section (no training)."""
    rng = np.random.default_rng(0)
    for stage, keys in (("sft", ("loss",)), ("rm", ("loss", "accuracy")), ("ppo", ("reward/score", "kl"))):
        rows = [{"step": s, **{k: float(rng.normal() + s / 10) for k in keys}} for s in range(40)]
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    x = rng.normal(size=(20, 32))
    overopt = {
        "bon": bon_sweep(
            {"rm": x.tolist(), "rm-small": (x + rng.normal(size=x.shape)).tolist()}, (x - 0.4 * x**2).tolist()
        )
    }
    points = [
        {"name": f"step-{i}", "kl": i * 1.5, "gold": 0.1 * i - 0.02 * i * i, "proxy/rm": 0.3 * i}
        for i in range(6)
    ]
    overopt["rl"] = rl_sweep(points, ["rm"])
    margins = rng.normal(0.5, 1.0, size=80).tolist()
    bench = benchmark_report(
        margins, [["length gap <5", "topic seen" if i % 2 else "topic unseen"] for i in range(80)]
    )
    gold_a, gold_b = rng.uniform(size=50), rng.uniform(size=50)
    return {
        "task": "top5",
        "seed": 0,
        "wall_seconds": 200.0,
        "stages": {
            "sft": {"wall_seconds": 40.0},
            "rm": {"wall_seconds": 30.0},
            "ppo": {"wall_seconds": 130.0},
        },
        "rm": {
            "heldout_accuracy": bench["accuracy"],
            "gold_agreement": 0.77,
            "n_train_pairs": 600,
            "bench": bench,
        },
        "eval": {
            "reference": "sft",
            "judge": "gold",
            "kl_estimator": "k1 summed over response tokens",
            "policies": {
                "sft": {
                    "gold_reward": 0.4,
                    "proxy_reward": 0.1,
                    "kl_from_sft": 0.0,
                    "distinct_2": 0.5,
                    "rouge_l": 0.3,
                },
                "ppo": {
                    "gold_reward": 0.6,
                    "proxy_reward": 1.2,
                    "kl_from_sft": 2.1,
                    "distinct_2": 0.4,
                    "rouge_l": 0.35,
                },
            },
            "win_rate_vs_sft": {"ppo": win_rate(gold_a, gold_b)},
        },
        "overopt": overopt,
        "feedback": {"n_labels": 700, "n_annotators": 12, "agreement_alpha": 0.4},
        "samples": [
            {
                "prompt": f"Top 5 films {XSS}?",
                "outputs": {
                    "sft": {"text": "1. Alien\n2. Heat", "gold": 0.2, "proxy": 0.1},
                    "ppo": {"text": f"1. Alien\n2. {XSS}", "gold": 0.1, "proxy": 0.9},
                },
            }
        ],
    }


def test_report_renders_in_chromium(tmp_path, page, screenshot_dir):
    run = tmp_path / "run"
    path = write_html_report(run, _synthetic_run(run))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    images = page.evaluate(
        "() => Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}))"
    )
    page.screenshot(path=str(screenshot_dir / "report.png"), full_page=True)
    assert page.console_errors == []
    # Curves of 3 stages, the policy chart, over-optimisation and reliability plots.
    assert len(images) == 6
    assert all(i["ok"] for i in images), images
    # Self-contained: the page itself and data: URIs only, never the network.
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    # Model text is shown as text, not run as markup.
    assert page.locator("script").count() == 0
    assert XSS in page.inner_text("body")
    assert page.locator("#overopt-fits tbody tr").count() == 3

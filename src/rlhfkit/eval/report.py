"""The human-readable run report: one self-contained HTML page and the CLI summary table."""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

import rlhfkit

KNOWN_STAGES = ("pretrain", "sft", "rm", "ppo")
MAX_KEYS_PER_STAGE = 8
# Metrics that earn a human title and a place at the front of their stage's plots.
FEATURED_KEYS: dict[str, dict[str, str]] = {
    "ppo": {"reward/score": "Proxy reward", "reward/gold": "Gold reward", "kl": "KL from SFT"},
}
# The policy table's own columns, besides KL from the reference (`kl_from_<reference>`).
_POLICY_KEYS = ("gold_reward", "proxy_reward")
# Bookkeeping metrics: still plotted when there is room, but after the ones that
# say whether training works.
_BOOKKEEPING = ("lr", "learning_rate", "epoch", "time", "wall", "elapsed", "per_s", "per_sec")


def read_metrics(path: Path | str) -> list[dict]:
    """Read a metrics.jsonl file (one JSON object per line); a missing file gives []."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: broken JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def _is_number(value: Any) -> bool:
    # numbers.Real admits numpy scalars too; bool is an int subclass, but a flag is not
    # a curve.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metric_keys(stage: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric metric keys of a stage, featured ones first, then losses, then the rest."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and _is_number(value):
                seen.setdefault(key, None)
    featured = list(FEATURED_KEYS.get(stage, {}))

    def rank(key: str) -> tuple[int, int]:
        if key in featured:
            return (0, featured.index(key))
        low = key.lower()
        if "loss" in low:
            return (1, 0)
        if "acc" in low or "reward" in low or "kl" in low:
            return (2, 0)
        if any(tag in low for tag in _BOOKKEEPING):
            return (4, 0)
        return (3, 0)

    # sorted() is stable, so keys of equal rank keep the order they were logged in.
    return sorted(seen, key=rank)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, skipping rows that did not log it."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if not _is_number(value):
            continue
        step = row.get("step")
        xs.append(float(step) if _is_number(step) else float(i))
        # inf would blow up the axis limits; a gap in the line is the honest picture.
        ys.append(float(value) if math.isfinite(value) else math.nan)
    return np.asarray(xs), np.asarray(ys)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points, ignoring NaNs; partial windows at the ends."""
    # Centred rather than trailing, so the smooth line does not lag behind the raw one.
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(np.float64), kernel, mode="same")
    return np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)


def _is_noisy(values: np.ndarray) -> bool:
    """Whether step-to-step jitter is large next to the curve's overall range."""
    finite = values[np.isfinite(values)]
    if finite.size < 20:
        return False
    # Percentiles and the median step, so one early plunge (a loss at step 0) neither
    # hides the jitter of the tail nor counts as jitter itself.
    lo, hi = np.percentile(finite, [5, 95])
    jitter = float(np.median(np.abs(np.diff(finite))))
    # A smooth curve (a schedule, a steady trend) moves about range / n per step;
    # smoothing it would only draw a second copy. Noise moves more than that.
    return hi > lo and jitter > float(hi - lo) * max(0.02, 3.0 / finite.size)


def png_base64(fig: Figure) -> str:
    """Render a figure to a base64 PNG string."""
    # An explicit Agg canvas on a bare Figure: nothing touches pyplot's global
    # figure registry or the caller's backend, so there is nothing left to close.
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: str) -> str:
    # Matplotlib reads $...$ as mathtext; metric names are labels, not formulas.
    return text.replace("$", r"\$")


def _curves_png(stage: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """Small multiples, one axes per metric key, against step."""
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    titles = FEATURED_KEYS.get(stage, {})
    for ax, key in zip(axes, keys, strict=False):
        xs, ys = _series(rows, key)
        if _is_noisy(ys):
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8)
            window = 2 * max(1, len(xs) // 50) + 1
            ax.plot(xs, _moving_average(ys, window), color="tab:blue", linewidth=1.6)
        else:
            marker = "o" if len(xs) < 20 else None
            ax.plot(xs, ys, color="tab:blue", marker=marker, markersize=3, linewidth=1.4)
        finite = ys[np.isfinite(ys)]
        if finite.size and np.ptp(finite) == 0:
            # A constant (a fixed learning rate) would otherwise get an offset-notation
            # axis like "1e-15+1e-3"; show the value plainly in a sane band around it.
            value = float(finite[0])
            pad = abs(value) * 0.5 or 1.0
            ax.set_ylim(value - pad, value + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(_plain(titles.get(key, key)), fontsize=10)
        if key in titles:
            ax.set_ylabel(_plain(key), fontsize=8, color="0.4")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return png_base64(fig)


def _stage_curves(run_dir: Path) -> list[dict]:
    """One plot per stage folder that has a metrics.jsonl, known stages first."""
    others = (
        sorted(
            p.name
            for p in run_dir.iterdir()
            if p.is_dir() and p.name not in KNOWN_STAGES and (p / "metrics.jsonl").is_file()
        )
        if run_dir.is_dir()
        else []
    )
    curves = []
    for stage in [*KNOWN_STAGES, *others]:
        rows = read_metrics(run_dir / stage / "metrics.jsonl")
        keys = _metric_keys(stage, rows)
        if not keys:
            continue
        shown = keys[:MAX_KEYS_PER_STAGE]
        curves.append(
            {
                "stage": stage,
                "png": _curves_png(stage, rows, shown),
                "n_rows": len(rows),
                "hidden": keys[MAX_KEYS_PER_STAGE:],
            }
        )
    return curves


def _policy_png(
    policies: Mapping[str, Mapping], win_rates: Mapping[str, Mapping], reference: str = "sft"
) -> str | None:
    """Bar chart of gold reward per policy, and win rate vs SFT with its CI when known."""
    gold = [(name, m.get("gold_reward")) for name, m in policies.items()]
    gold = [(name, float(v)) for name, v in gold if _is_number(v)]
    wins = [(name, w) for name, w in win_rates.items() if _is_number(w.get("rate"))]
    if not gold and not wins:
        return None
    panels = int(bool(gold)) + int(bool(wins))
    fig = Figure(figsize=(4.6 * panels, 3.0), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False).ravel())
    if gold:
        ax = axes.pop(0)
        names = [_plain(n) for n, _ in gold]
        bars = ax.bar(names, [v for _, v in gold], color="tab:green", alpha=0.8)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title("Gold reward (held-out prompts)", fontsize=10)
        ax.axhline(0.0, color="0.3", linewidth=0.6)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if wins:
        ax = axes.pop(0)
        names = [_plain(n) for n, _ in wins]
        rates = np.array([float(w["rate"]) for _, w in wins])
        # An entry without a usable CI gets a zero-length error bar.
        bounds = np.array([_ci(w) or (float(w["rate"]),) * 2 for _, w in wins])
        lo, hi = bounds[:, 0], bounds[:, 1]
        ax.bar(names, rates, color="tab:purple", alpha=0.8)
        # Clip at 0: a CI that does not contain its own rate must not make negative bars.
        yerr = np.clip([rates - lo, hi - rates], 0.0, None)
        ax.errorbar(names, rates, yerr=yerr, fmt="none", ecolor="k", capsize=4, linewidth=1)
        ax.axhline(0.5, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.set_title(f"Win rate vs {_plain(reference)} (95% CI)", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def _reliability_png(calibration: Mapping[str, Any]) -> str | None:
    """Reliability diagram: RM confidence sigmoid(|score diff|) per bin against gold agreement."""
    bins = [b for b in calibration.get("bins") or [] if _is_number(b.get("accuracy"))]
    if not bins:
        return None
    fig = Figure(figsize=(4.2, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="0.5", linewidth=0.8, label="perfectly calibrated")
    conf = [float(b["confidence"]) for b in bins]
    acc = [float(b["accuracy"]) for b in bins]
    ax.plot(conf, acc, "o-", color="tab:red", label="reward model")
    for c, a, b in zip(conf, acc, bins, strict=True):
        ax.annotate(f"n={b['n']}", (c, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("RM confidence sigmoid(|score difference|)", fontsize=8)
    ax.set_ylabel("agreement with the gold judge", fontsize=8)
    ece = calibration.get("ece")
    ax.set_title("Reliability" + (f" (ECE {float(ece):.3f})" if _is_number(ece) else ""), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return png_base64(fig)


def label_curve_png(points: Sequence[Mapping[str, Any]], title: str) -> str | None:
    """Reward-model held-out accuracy against the number of labels it learnt from, as a base64 PNG.

    `points` carry `n_labels` and `heldout_accuracy`; fewer than two usable ones are no curve.
    """
    shown = sorted(
        (float(p["n_labels"]), float(p["heldout_accuracy"]))
        for p in points
        if _is_number(p.get("n_labels")) and _is_number(p.get("heldout_accuracy"))
    )
    if len(shown) < 2:
        return None
    xs, ys = zip(*shown, strict=True)
    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, ys, "o-", color="tab:blue", label="reward model")
    for x, y in shown:
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(0.5, color="0.5", linestyle="--", linewidth=0.8, label="chance")
    # From zero labels, so that the spacing of the points shows how many labels each one adds.
    ax.set_xlim(0.0, max(xs) * 1.06)
    ax.set_ylim(min(0.45, min(ys) - 0.05), 1.02)
    ax.set_xlabel("labels", fontsize=8)
    ax.set_ylabel("accuracy on gold-labelled held-out pairs", fontsize=8)
    ax.set_title(_plain(title), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    return png_base64(fig)


def _label_curve_context(points: Any) -> dict | None:
    """The label-efficiency table and plot of report.json's rm.label_curve."""
    if not isinstance(points, list) or not points:
        return None
    rows = [_mapping(p) for p in points]
    return {"points": rows, "png": label_curve_png(rows, "Label efficiency")}


def _bench_context(bench: Mapping[str, Any]) -> dict | None:
    """The RM benchmark section: overall and per-subset accuracy, ECE and the reliability plot."""
    if not bench:
        return None
    calibration = _mapping(bench.get("calibration"))
    subsets = [
        (name, _mapping(v).get("accuracy"), _mapping(v).get("n"))
        for name, v in _mapping(bench.get("subsets")).items()
    ]
    return {
        "accuracy": bench.get("accuracy"),
        "n_pairs": bench.get("n_pairs"),
        "dropped": bench.get("n_gold_ties_dropped"),
        "ece": calibration.get("ece"),
        "subsets": subsets,
        "png": _reliability_png(calibration),
    }


def _rm_rows(rm: Mapping[str, Any]) -> dict[str, Any]:
    """The reward-model table's figures; a held-out accuracy that is null or absent (eval.heldout_pairs
    0, no gold judge, no eval yet) reads "not measured", with its reason when report.json gives one."""
    rows = {
        k: v for k, v in rm.items() if k not in ("bench", "label_curve", "probes", "heldout_accuracy_reason")
    }
    if rm and not _is_number(rm.get("heldout_accuracy")):
        reason = rm.get("heldout_accuracy_reason")
        rows["heldout_accuracy"] = f"not measured ({reason})" if reason else "not measured"
    return rows


def _overopt_context(overopt: Mapping[str, Any]) -> dict | None:
    """The over-optimisation section: the plot (re-drawn from the data) and one fit row per curve."""
    if not overopt:
        return None
    from rlhfkit.eval.overopt import overopt_png

    rows = []
    for kind, label in (("bon", "best-of-n"), ("rl", "RL checkpoints")):
        sweep = _mapping(overopt.get(kind))
        for name, rm in _mapping(sweep.get("rms")).items():
            rm = _mapping(rm)
            fit_gold = _mapping(rm.get("fit_gold") or sweep.get("fit_gold"))
            fit_proxy = _mapping(rm.get("fit_proxy"))
            rows.append(
                {
                    "sweep": label,
                    "rm": name,
                    "peak_at": rm.get("gold_peak_at"),
                    "drop": rm.get("gold_drop_after_peak"),
                    "proxy_monotone": rm.get("proxy_monotone"),
                    "gold": fit_gold,
                    "proxy": fit_proxy,
                }
            )
    try:
        png = overopt_png(overopt)
    except (KeyError, TypeError, ValueError):
        # A report.json edited by hand or from an older version: the table still shows.
        png = None
    return {"rows": rows, "png": png, "plot": overopt.get("plot")}


def _extra_policy_keys(policies: Mapping[str, Mapping], reference: str) -> list[str]:
    """Numeric per-policy figures beyond the three documented ones, as extra columns."""
    keys: dict[str, None] = {}
    for metrics in policies.values():
        for key, value in metrics.items():
            if key not in (*_POLICY_KEYS, f"kl_from_{reference}") and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def _ci(entry: Mapping[str, Any]) -> tuple[float, float] | None:
    """The (lo, hi) of a win-rate entry, or None when it has no usable ci95."""
    ci = entry.get("ci95")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_is_number(c) for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def _scalar_items(section: Mapping[str, Any], first: Sequence[str]) -> list[tuple[str, Any]]:
    """Key/value rows of a section, the documented keys first, nested values as JSON."""
    order = [k for k in first if k in section] + [k for k in section if k not in first]
    items = []
    for key in order:
        value = section[key]
        if isinstance(value, Mapping | list | tuple):
            value = json.dumps(value, default=str)
        items.append((key, value))
    return items


def _fmt(value: Any, digits: int = 4) -> str:
    """A number shown with a few significant digits; anything else as text, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        # Plain digits for ordinary magnitudes; tiny ones (a KL of 3e-5) stay readable.
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _fmt_seconds(value: Any) -> str:
    """Seconds as '83.2 s (1m 23s)'."""
    if not _is_number(value):
        return _fmt(value)
    seconds = float(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
    return f"{seconds:.1f} s ({clock})"


def _fmt_winrate(entry: Any) -> str:
    """'0.71 [0.66, 0.76]', or '-' when there is no win rate."""
    if not isinstance(entry, Mapping) or not _is_number(entry.get("rate")):
        return "-"
    text = f"{float(entry['rate']):.2f}"
    ci = _ci(entry)
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text


def _samples(report: Mapping[str, Any]) -> tuple[list[str], list[dict]]:
    """Sample outputs with every output as {"text", "gold", "proxy"}, and the policy columns.

    Policies are the columns in order of first appearance; an output given as a bare
    string is taken as its text, and a missing one is None (an empty cell).
    """
    policies: dict[str, None] = {}
    samples = []
    for sample in report.get("samples") or []:
        outputs: dict[str, dict | None] = {}
        for name, out in (sample.get("outputs") or {}).items():
            policies.setdefault(name, None)
            if isinstance(out, str):
                out = {"text": out}
            outputs[name] = (
                {"text": out.get("text", ""), "gold": out.get("gold"), "proxy": out.get("proxy")}
                if isinstance(out, Mapping)
                else None
            )
        samples.append({"prompt": sample.get("prompt", ""), "outputs": outputs})
    return list(policies), samples


def _mapping(value: Any) -> Mapping[str, Any]:
    """The value if it is a mapping, else an empty one: absent sections render as absent."""
    return value if isinstance(value, Mapping) else {}


def _environment() -> jinja2.Environment:
    # Autoescape on for everything: sample outputs are model text and must never be
    # able to inject markup into the page.
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["num"] = _fmt
    env.filters["seconds"] = _fmt_seconds
    env.filters["winrate"] = _fmt_winrate
    return env


def write_html_report(run_dir: Path, report: dict) -> Path:
    """Write ``run_dir/report.html``: a self-contained page (plots as embedded PNG)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluation = _mapping(report.get("eval"))
    policies = {name: _mapping(m) for name, m in _mapping(evaluation.get("policies")).items()}
    reference = str(evaluation.get("reference") or "sft")
    win_rates = {
        name: _mapping(w) for name, w in _mapping(evaluation.get(f"win_rate_vs_{reference}")).items()
    }
    sample_policies, samples = _samples(report)
    rm_section = _mapping(report.get("rm"))
    bench = _mapping(rm_section.get("bench"))
    overopt = _mapping(report.get("overopt"))
    context = {
        "title": f"rlhfkit report: {report.get('task', 'run')}",
        "task": report.get("task"),
        "seed": report.get("seed"),
        "wall_seconds": report.get("wall_seconds"),
        "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "version": rlhfkit.__version__,
        "run_dir": str(run_dir),
        "stages": [
            (
                name,
                _mapping(info).get("wall_seconds"),
                [(k, v) for k, v in _mapping(info).items() if k != "wall_seconds" and _is_number(v)],
            )
            for name, info in _mapping(report.get("stages")).items()
        ],
        "curves": _stage_curves(run_dir),
        "policies": [(name, m, win_rates.get(name)) for name, m in policies.items()],
        "policy_extra_keys": _extra_policy_keys(policies, reference),
        "kl_key": f"kl_from_{reference}",
        "extra_win_rates": [(n, w) for n, w in win_rates.items() if n not in policies],
        "policy_png": _policy_png(policies, win_rates, reference),
        "reference": reference,
        "judge": evaluation.get("judge", "gold"),
        "judge_model": evaluation.get("judge_model"),
        "kl_estimator": evaluation.get("kl_estimator"),
        "rm": _scalar_items(_rm_rows(rm_section), ("heldout_accuracy", "gold_agreement", "n_train_pairs")),
        "bench": _bench_context(bench),
        "probes": [(kind, _mapping(p)) for kind, p in _mapping(rm_section.get("probes")).items()],
        "label_curve": _label_curve_context(rm_section.get("label_curve")),
        "overopt": _overopt_context(overopt),
        "feedback": _scalar_items(
            _mapping(report.get("feedback")), ("n_labels", "n_annotators", "agreement_alpha")
        ),
        "sample_policies": sample_policies,
        "samples": samples,
        "loop_rounds": list(_mapping(report.get("loop")).get("rounds") or []),
        "loop_png": loop_rounds_png(list(_mapping(report.get("loop")).get("rounds") or [])),
        "loop_curve_png": loop_label_curve_png(list(_mapping(report.get("loop")).get("rounds") or [])),
    }
    source = files("rlhfkit.eval").joinpath("templates/report.html.j2").read_text("utf-8")
    html = _environment().from_string(source).render(**context)
    out = run_dir / "report.html"
    out.write_text(html, encoding="utf-8")
    return out


def summary_table(report: dict) -> Table:
    """The short per-policy table the CLI prints at the end of a run."""
    evaluation = _mapping(report.get("eval"))
    policies = _mapping(evaluation.get("policies"))
    reference = str(evaluation.get("reference") or "sft")
    win_rates = _mapping(evaluation.get(f"win_rate_vs_{reference}"))
    table = Table(title="Evaluation on held-out prompts", title_justify="left")
    table.add_column("policy", style="bold")
    table.add_column("gold reward", justify="right")
    table.add_column("proxy reward", justify="right")
    table.add_column(Text(f"KL from {reference}"), justify="right")
    table.add_column(Text(f"win rate vs {reference} [95% CI]"), justify="right")

    def number(value: Any) -> str:
        return f"{float(value):.3f}" if _is_number(value) else "-"

    for name, metrics in policies.items():
        metrics = _mapping(metrics)
        table.add_row(
            # Text, not a str: a policy name is a label, never rich markup.
            Text(str(name)),
            number(metrics.get("gold_reward")),
            number(metrics.get("proxy_reward")),
            number(metrics.get(f"kl_from_{reference}")),
            Text("-" if name == reference else _fmt_winrate(win_rates.get(name))),
        )
    return table


def loop_rounds_png(rounds: Sequence[Mapping[str, Any]]) -> str | None:
    """Gold reward and win rate vs SFT (with its 95% CI) per round, as a base64 PNG."""
    import numpy as np
    from matplotlib.figure import Figure

    shown = [r for r in rounds if r.get("win_rate_vs_sft")]
    if not shown:
        return None
    x = [r["round"] for r in shown]
    fig = Figure(figsize=(9.2, 3.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    gold = [r.get("gold_reward") for r in shown]
    if all(g is not None for g in gold):
        left.plot(x, gold, marker="o", color="tab:green", label="gold reward")
    proxy = [r.get("proxy_reward") for r in shown]
    if all(p is not None for p in proxy):
        left.plot(x, proxy, marker="s", color="tab:orange", label="proxy reward (round's RM)")
    left.set_title("Reward of each round's policy", fontsize=10)
    if left.lines:
        left.legend(fontsize=8)
    else:  # a task without a gold judge, and rounds that recorded no proxy reward
        left.text(0.5, 0.5, "no reward recorded", ha="center", va="center", transform=left.transAxes)
    rates = np.array([r["win_rate_vs_sft"]["rate"] for r in shown])
    ci = np.array([r["win_rate_vs_sft"].get("ci95") or (r["win_rate_vs_sft"]["rate"],) * 2 for r in shown])
    yerr = np.clip([rates - ci[:, 0], ci[:, 1] - rates], 0.0, None)
    right.errorbar(x, rates, yerr=yerr, marker="o", color="tab:purple", capsize=4)
    right.axhline(0.5, color="0.3", linestyle="--", linewidth=0.8)
    right.set_ylim(0.0, 1.0)
    right.set_title("Win rate vs SFT (95% CI)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("round", fontsize=8)
        ax.set_xticks(x)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    return png_base64(fig)


def loop_label_curve_png(rounds: Sequence[Mapping[str, Any]]) -> str | None:
    """The label-efficiency curve across rounds: each round's RM accuracy against the labels so far."""
    points = [
        {"n_labels": r.get("n_labels_total"), "heldout_accuracy": r.get("rm_heldout_accuracy")}
        for r in rounds
        if isinstance(r, Mapping)
    ]
    return label_curve_png(points, "Reward model by labels so far (one point per round)")

"""Reward over-optimisation (Gao, Schulman, Hilton 2022): gold and proxy reward against sqrt(KL).

Two sweeps move a policy away from the SFT policy:
- best-of-n: n = 1..max_n, KL analytic (log n - (n-1)/n), rewards from one set of N
  samples per prompt through the unbiased order-statistics estimator;
- RL checkpoints: each a saved policy, KL from the SFT policy sampled (k1).
Both are fitted with Gao et al.'s functional forms in d = sqrt(KL), on rewards taken
relative to the SFT policy (d = 0): R_bon(d) = d (a - b d), R_RL(d) = d (a - b log d).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.data.io import strict_json

Utility = Callable[[str, str], float]

# A geometric grid: the curves bend on a log scale of n, and 16 points are enough to fit.
BON_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """Weights w_i (ascending rank i) with E[max of n draws] = sum_i w_i x_(i), unbiased from N samples.

    Drawing n of the N samples without replacement, the i-th smallest is the maximum with
    probability C(i-1, n-1) / C(N, n); computed in log space, since C(256, 128) overflows.
    """
    if not 1 <= n <= n_samples:
        raise ValueError(f"best-of-n needs 1 <= n <= samples per prompt, got n={n} with {n_samples} samples")
    i = np.arange(1, n_samples + 1)
    w = np.zeros(n_samples)
    ok = i >= n
    log_choose = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)  # noqa: E731
    log_total = log_choose(n_samples, n)
    w[ok] = np.exp([log_choose(k - 1, n - 1) - log_total for k in i[ok]])
    return w


def best_of_n_expectation(selector: Sequence[float], values: Sequence[float], n: int) -> float:
    """E[value of the sample the selector ranks best among n draws], from one prompt's N samples.

    Ties in the selector are broken by the stable sort order, i.e. arbitrarily but fixed.
    """
    s = np.asarray(selector, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"selector and values must be equally long 1-d lists, got {s.shape} and {v.shape}")
    order = np.argsort(s, kind="stable")
    return float(best_of_n_weights(s.size, n) @ v[order])


def _gao_design(x: np.ndarray, form: str) -> np.ndarray:
    """Columns (d, -d^2) for form "bon", (d, -d log d) for "rl": R(d) = design @ (a, b)."""
    second = x * x if form == "bon" else x * np.log(np.where(x > 0, x, 1.0))
    return np.stack([x, -second], axis=1)


def gao_fit_problem(d: Sequence[float], form: str) -> str | None:
    """Why `fit_gao` cannot fit these d (fewer than 3 points, or a and b not identifiable), or None."""
    x = np.asarray(d, dtype=np.float64)
    if x.size < 3:
        return f"fewer than 3 points of (d, reward): {x.size}"
    # d = 0 (and for "rl" d = 1 in the second column) says nothing about one of a, b: a single
    # distinct d > 0 leaves a line of equally good (a, b), and lstsq would return an arbitrary one.
    if np.linalg.matrix_rank(_gao_design(x, form)) < 2:
        return (
            f"a and b are not identifiable from d = sqrt(KL) = {np.round(x, 4).tolist()}: "
            "it needs at least two distinct d > 0"
        )
    return None


def fit_gao(d: Sequence[float], reward: Sequence[float], form: str) -> dict[str, float]:
    """Least-squares fit of R(d) = d (a - b d) (form "bon") or d (a - b log d) (form "rl").

    Both are linear in (a, b), so this is one lstsq solve; R^2 is against the mean of
    `reward`. Points with d = 0 carry no information about a, b (R = 0 there) but do count
    in R^2, as the origin the curves pass through. With only two points at d > 0 the two
    parameters go through them exactly: R^2 would be 1 whatever the data, so it is NaN (null
    in JSON), as it is when every reward is equal. Raises ValueError when a, b cannot be
    fitted (`gao_fit_problem`), the lengths differ, the form is unknown, or a d is negative.
    """
    x = np.asarray(d, dtype=np.float64)
    y = np.asarray(reward, dtype=np.float64)
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"fit_gao needs at least 3 points of (d, reward), got {x.size} and {y.size}")
    if form not in ("bon", "rl"):
        raise ValueError(f"fit_gao form must be 'bon' or 'rl', got {form!r}")
    if (x < 0).any():
        raise ValueError("fit_gao: d = sqrt(KL) must be >= 0")
    problem = gao_fit_problem(x, form)
    if problem:
        raise ValueError(f"fit_gao: {problem}")
    design = _gao_design(x, form)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    predicted = design @ np.array([a, b])
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    residual_dof = int((x > 0).sum()) - 2
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 and residual_dof > 0 else float("nan")
    return {"a": float(a), "b": float(b), "r2": r2}


def gao_curve(d: np.ndarray, a: float, b: float, form: str) -> np.ndarray:
    """The fitted curve R(d) of `fit_gao`'s forms."""
    if form == "bon":
        return d * (a - b * d)
    return d * (a - b * np.log(np.where(d > 0, d, 1.0)))


def bon_sweep(
    proxy: Mapping[str, Sequence[Sequence[float]]],
    gold: Sequence[Sequence[float]],
    grid: Sequence[int] = BON_GRID,
) -> dict:
    """Best-of-n curves per proxy RM from per-prompt samples: proxy[rm][prompt][sample], gold[prompt][sample].

    For each RM the sample is chosen by that RM's score; gold and proxy are averaged over
    prompts and reported relative to n = 1 (the SFT policy), with the Gao fits.
    """
    n_samples = min(len(row) for row in gold)
    ns = [n for n in grid if n <= n_samples]
    kl = [best_of_n_kl(n) for n in ns]
    d = [math.sqrt(k) for k in kl]
    out: dict = {"n": ns, "kl": kl, "sqrt_kl": d, "samples_per_prompt": n_samples, "n_prompts": len(gold)}
    out["rms"] = {}
    fit_problem = gao_fit_problem(d, "bon")
    if fit_problem:
        out["fit_skipped"] = fit_problem
    for name, scores in proxy.items():
        g_curve, p_curve = [], []
        for n in ns:
            g_curve.append(
                float(np.mean([best_of_n_expectation(s, g, n) for s, g in zip(scores, gold, strict=True)]))
            )
            p_curve.append(float(np.mean([best_of_n_expectation(s, s, n) for s in scores])))
        g_rel = [g - g_curve[0] for g in g_curve]
        p_rel = [p - p_curve[0] for p in p_curve]
        entry = {"gold": g_curve, "proxy": p_curve, "gold_rel": g_rel, "proxy_rel": p_rel}
        if not fit_problem:
            entry["fit_gold"] = fit_gao(d, g_rel, "bon")
            entry["fit_proxy"] = fit_gao(d, p_rel, "bon")
        entry.update(_shape(ns, g_curve, p_curve))
        out["rms"][name] = entry
    return out


def _shape(xs: Sequence[float], gold: Sequence[float], proxy: Sequence[float]) -> dict:
    """Where gold peaks, and whether it falls after the peak while proxy keeps rising."""
    peak = int(np.argmax(gold))
    return {
        "gold_peak_at": xs[peak],
        "gold_peak": gold[peak],
        "gold_drop_after_peak": gold[peak] - gold[-1],
        "proxy_monotone": bool(all(b >= a - 1e-9 for a, b in zip(proxy, proxy[1:], strict=False))),
    }


def rl_sweep(points: Sequence[Mapping[str, float]], rm_names: Sequence[str]) -> dict:
    """Curves and fits of RL checkpoints: points are {"name", "kl", "gold", "proxy/<rm>"}, SFT first."""
    if not points:
        raise ValueError("rl_sweep needs at least the SFT point")
    d = [math.sqrt(max(p["kl"], 0.0)) for p in points]
    out: dict = {
        "checkpoints": [p["name"] for p in points],
        "kl": [p["kl"] for p in points],
        "sqrt_kl": d,
        "gold": [p["gold"] for p in points],
        "rms": {},
    }
    gold_rel = [p["gold"] - points[0]["gold"] for p in points]
    out["gold_rel"] = gold_rel
    # A checkpoint whose sampled k1 is negative sits at d = 0 with SFT.
    fit_problem = gao_fit_problem(d, "rl")
    if fit_problem:
        out["fit_skipped"] = fit_problem
    else:
        out["fit_gold"] = fit_gao(d, gold_rel, "rl")
    for name in rm_names:
        proxy = [p[f"proxy/{name}"] for p in points]
        entry: dict = {"proxy": proxy, "proxy_rel": [x - proxy[0] for x in proxy]}
        if not fit_problem:
            entry["fit_proxy"] = fit_gao(d, entry["proxy_rel"], "rl")
        entry.update(_shape(out["checkpoints"], out["gold"], proxy))
        out["rms"][name] = entry
    return out


def check_overopt_lengths(
    sft_path: Path, model_paths: Sequence[Path], prompts: list[str], max_new_tokens: int
) -> None:
    """ValueError naming overopt.max_new_tokens when a prompt and its response overrun the learned
    position table (GPT-2's n_positions) of the SFT policy or any of `model_paths` (checkpoints,
    proxy RMs): every one of them reads a prompt and its whole response."""
    from rlhfkit.models.loading import check_prompt_room, load_tokenizer, position_table

    tokenizer = load_tokenizer(sft_path)
    for path in dict.fromkeys([Path(sft_path), *map(Path, model_paths)]):
        check_prompt_room(position_table(path), tokenizer, prompts, "overopt.max_new_tokens", max_new_tokens)


@torch.no_grad()
def sample_bon_pool(
    policy_path: Path,
    reward_paths: Mapping[str, Path],
    prompts: list[str],
    gold: Utility,
    *,
    samples_per_prompt: int,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[list[float]]], list[list[float]], list[list[str]]]:
    """N samples per prompt from the policy, scored by every proxy RM and the gold judge."""
    from rlhfkit.eval.evaluate import score_with_reward_model
    from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_responses

    tokenizer = load_tokenizer(policy_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy = load_causal_lm(policy_path).eval()
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    # Prompt-major order (every prompt's N samples together), sampled in big flat batches.
    flat = [ids[i] for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    torch.manual_seed(seed)
    responses = sample_responses(
        policy,
        flat,
        eos_id=eos,
        pad_id=pad,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        on_batch=on_batch,
    )
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    del policy

    def by_prompt(values: Sequence) -> list[list]:
        return [
            list(values[i * samples_per_prompt : (i + 1) * samples_per_prompt]) for i in range(len(prompts))
        ]

    proxy = {}
    for name, path in reward_paths.items():
        rm = load_reward_model(path, pad).eval()
        proxy[name] = by_prompt(score_with_reward_model(rm, flat, responses, pad))
    golds = by_prompt([gold(prompts[i // samples_per_prompt], t) for i, t in enumerate(texts)])
    return proxy, golds, by_prompt(texts)


@torch.no_grad()
def checkpoint_points(
    sft_path: Path,
    checkpoints: Mapping[str, Path],
    reward_paths: Mapping[str, Path],
    prompts: list[str],
    gold: Utility,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
) -> list[dict]:
    """Gold, proxy (per RM) and sampled KL from SFT of the SFT policy and each checkpoint."""
    from rlhfkit.eval.evaluate import score_with_reward_model, sequence_kl
    from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_responses

    tokenizer = load_tokenizer(sft_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    sft = load_causal_lm(sft_path).eval()
    rms = {name: load_reward_model(path, pad).eval() for name, path in reward_paths.items()}
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    points = []
    for name, path in {"sft": sft_path, **checkpoints}.items():
        model = sft if name == "sft" else load_causal_lm(path).eval()
        torch.manual_seed(seed)
        responses = sample_responses(
            model, ids, eos_id=eos, pad_id=pad, max_new_tokens=max_new_tokens, temperature=temperature
        )
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        kl = (
            0.0
            if name == "sft"
            else float(np.mean(sequence_kl(model, sft, ids, responses, pad, temperature)))
        )
        point = {
            "name": name,
            "kl": kl,
            "gold": float(np.mean([gold(p, t) for p, t in zip(prompts, texts, strict=True)])),
        }
        for rm_name, rm in rms.items():
            point[f"proxy/{rm_name}"] = float(np.mean(score_with_reward_model(rm, ids, responses, pad)))
        points.append(point)
    return points


def overopt_png(result: Mapping) -> str | None:
    """Gold and proxy reward (relative to SFT) against sqrt(KL), one panel per sweep, with the fits."""
    from matplotlib.figure import Figure

    from rlhfkit.eval.report import png_base64

    sweeps = [(k, result[k]) for k in ("bon", "rl") if result.get(k)]
    if not sweeps:
        return None
    fig = Figure(figsize=(5.6 * len(sweeps), 3.8), layout="constrained")
    axes = fig.subplots(1, len(sweeps), squeeze=False).ravel()
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, (kind, sweep) in zip(axes, sweeps, strict=True):
        d = np.asarray(sweep["sqrt_kl"])
        # Checkpoints need not move monotonically away from SFT: draw lines in order of d.
        order = np.argsort(d, kind="stable")
        fine = np.linspace(0.0, float(d.max()) if d.size else 1.0, 100)
        proxy_ax = ax.twinx()
        form = "bon" if kind == "bon" else "rl"
        if kind == "rl":
            # One policy per checkpoint, so one gold curve whatever the proxy RMs.
            ax.plot(
                d[order], np.asarray(sweep["gold_rel"])[order], "o-", color="k", markersize=3, label="gold"
            )
            if sweep.get("fit_gold"):
                fit = sweep["fit_gold"]
                ax.plot(fine, gao_curve(fine, fit["a"], fit["b"], form), ":", color="k", linewidth=1)
        for colour, (name, rm) in zip(colours, sweep["rms"].items(), strict=False):
            if kind == "bon":
                ax.plot(d, rm["gold_rel"], "o-", color=colour, markersize=3, label=f"gold ({name})")
                fit = rm.get("fit_gold")
                if fit:
                    ax.plot(fine, gao_curve(fine, fit["a"], fit["b"], form), ":", color=colour, linewidth=1)
            proxy = np.asarray(rm["proxy_rel"])[order]
            proxy_ax.plot(
                d[order], proxy, "s--", color=colour, markersize=3, alpha=0.6, label=f"proxy ({name})"
            )
        ax.axhline(0.0, color="0.5", linewidth=0.6)
        title = "Best-of-n" if kind == "bon" else "RL checkpoints"
        ax.set_title(f"{title}: reward relative to SFT", fontsize=10)
        ax.set_xlabel("sqrt(KL from SFT) [sqrt(nats)]", fontsize=9)
        ax.set_ylabel("gold reward (solid; dotted = fit)", fontsize=9)
        proxy_ax.set_ylabel("proxy reward (dashed)", fontsize=9)
        handles = ax.get_legend_handles_labels()
        more = proxy_ax.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return png_base64(fig)


def run_overopt(
    out_dir: Path,
    sft_path: Path,
    reward_paths: Mapping[str, Path],
    checkpoints: Mapping[str, Path],
    prompts: list[str],
    gold: Utility,
    *,
    samples_per_prompt: int,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Both sweeps (best-of-n always, RL when checkpoints are given); writes overopt.json and overopt.png.

    Lengths beyond a model's learned positions are refused before any sampling and before
    `out_dir` is made (`check_overopt_lengths`), not as an IndexError in the middle of the work.
    """
    import base64
    import json

    check_overopt_lengths(sft_path, [*checkpoints.values(), *reward_paths.values()], prompts, max_new_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proxy, golds, _ = sample_bon_pool(
        sft_path,
        reward_paths,
        prompts,
        gold,
        samples_per_prompt=samples_per_prompt,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        on_batch=on_batch,
    )
    result: dict = {
        "bon": bon_sweep(proxy, golds),
        "reward_models": {k: str(v) for k, v in reward_paths.items()},
    }
    if checkpoints:
        points = checkpoint_points(
            sft_path,
            checkpoints,
            reward_paths,
            prompts,
            gold,
            seed=seed,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )
        result["rl"] = rl_sweep(points, list(reward_paths))
        result["rl"]["kl_estimator"] = "k1 summed over response tokens, on samples from the checkpoint"
    png = overopt_png(result)
    if png is not None:
        (out_dir / "overopt.png").write_bytes(base64.b64decode(png))
        result["plot"] = str(out_dir / "overopt.png")
    (out_dir / "overopt.json").write_text(
        json.dumps(strict_json(result), indent=2, allow_nan=False), encoding="utf-8"
    )
    return result


def reward_model_paths(proxy: Path, extra: Sequence[Path]) -> dict[str, Path]:
    """The run's proxy RM as "rm", then each extra RM folder named as `rlhfkit eval` names policy
    folders (`folder_labels`): by its short label, or by its full path on a clash, "rm" included."""
    from rlhfkit.eval.evaluate import folder_labels

    for path in extra:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"--rm {path}: no saved model (config.json) there")
    labels = folder_labels(extra, taken={"rm"})
    out = {"rm": Path(proxy)}
    for path in extra:
        out.setdefault(labels[Path(path).resolve()], Path(path))
    return out


def checkpoint_paths(folders: Sequence[Path]) -> dict[str, Path]:
    """Policy folders of the RL sweep by name, named as `rlhfkit eval` names policy folders
    (`folder_labels`): "checkpoints/step-20", or every folder by its full path when two share a
    label (two runs' step-20) or one is "sft", the sweep's first point. The same folder twice is one."""
    from rlhfkit.eval.evaluate import folder_labels

    for path in folders:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"--checkpoint {path}: no saved model (config.json) there")
    labels = folder_labels(folders, taken={"sft"})
    out: dict[str, Path] = {}
    for path in folders:
        out.setdefault(labels[Path(path).resolve()], Path(path))
    return out


def saved_checkpoints(stage_dir: Path) -> list[Path]:
    """The policy checkpoints a training stage saved (STAGE/checkpoints/step-N/), in step order."""
    # step-* only: a checkpoint being written is a hidden .step-N.tmp folder.
    folders = [p for p in (Path(stage_dir) / "checkpoints").glob("step-*") if (p / "config.json").is_file()]
    return sorted(folders, key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0))


def summary_rows(result: Mapping) -> list[str]:
    """One line per sweep and proxy RM: where gold peaks, and the fitted a, b, R^2."""
    rows = []
    for kind in ("bon", "rl"):
        sweep = result.get(kind)
        if not sweep:
            continue
        for name, rm in sweep["rms"].items():
            fit_g = rm.get("fit_gold", sweep.get("fit_gold")) or {}
            fit_p = rm.get("fit_proxy") or {}
            fits = (
                f"no fit: {sweep['fit_skipped']}"
                if sweep.get("fit_skipped")
                else f"fit gold a={fit_g.get('a', float('nan')):.3f} b={fit_g.get('b', float('nan')):.3f} "
                f"R^2={fit_g.get('r2', float('nan')):.3f}; "
                f"fit proxy a={fit_p.get('a', float('nan')):.3f} b={fit_p.get('b', float('nan')):.3f} "
                f"R^2={fit_p.get('r2', float('nan')):.3f}"
            )
            rows.append(
                f"{kind} [{name}]: gold peaks at {rm['gold_peak_at']} ({rm['gold_peak']:.3f}), "
                f"drops {rm['gold_drop_after_peak']:.3f} after; proxy monotone={rm['proxy_monotone']}; {fits}"
            )
    return rows

"""Figures for the notebooks and reports. Each function draws one figure, saves it as PNG in `out_dir`
(when given) and returns it, so a notebook cell is one call."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

GB = 10**9
MB = 10**6


def _save(fig, out_dir: str | Path | None, name: str):
    fig.tight_layout()
    if out_dir:
        fig.savefig(Path(out_dir) / f"{name}.png", dpi=110)
    return fig


def _instead(fig, ax, text: str, out_dir, name: str):
    """A figure that says why there is nothing to draw (kept in the report, so its absence is explained)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return _save(fig, out_dir, name)


def weight_bars(profile: dict, out_dir=None):
    """Weight GB per component for every preset (this checkpoint, and FLUX.1-schnell at full size), and the
    GPU-resident GB of every placement at full size against Vortex's share."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("plans_this_checkpoint", f"this checkpoint (loaded: {profile['weights']['total']['gb']:.4f} GB "
                                        "measured)"),
              ("plans_full_size", "FLUX.1-schnell full size"))
    components = [c for c in profile["weights"] if c != "total"]
    for ax, (key, title) in zip(axes, panels):
        presets = list(profile[key])
        bottom = np.zeros(len(presets))
        for comp in components:
            values = np.array([profile[key][p]["resident"]["components"][comp]["weight_bytes"] / GB for p in presets])
            ax.bar(presets, values, bottom=bottom, label=comp)
            bottom += values
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("weights (GB; unquantized in the run's dtype)")
    axes[1].legend(fontsize=8)
    plans = profile["plans_full_size"]
    presets = list(plans)
    placements = list(plans[presets[0]])
    width = 0.8 / len(placements)
    for i, placement in enumerate(placements):
        axes[2].bar(np.arange(len(presets)) + i * width, [plans[q][placement]["resident_bytes"] / GB for q in presets],
                    width, label=placement)
    share = plans[presets[0]][placements[0]]["budget_bytes"] / GB
    axes[2].axhline(share, color="red", linestyle="--", label=f"Vortex share {share:.1f} GB")
    axes[2].set_xticks(np.arange(len(presets)) + width * (len(placements) - 1) / 2, presets)
    axes[2].set_title("full size: GPU-resident GB per placement", fontsize=10)
    axes[2].set_ylabel("GB")
    axes[2].legend(fontsize=8)
    return _save(fig, out_dir, "vram_weights")


def memory_timeline(profile: dict, share_gb: float, out_dir=None):
    """Allocated / reserved / peak per phase against Flux's share of the card. A phase without a peak (the load: a
    guest leaves the process's peak counters to its host) leaves a gap."""
    rows = profile["timeline"]
    fig, ax = plt.subplots(figsize=(8, 4))
    if not profile["device_memory_available"]:
        return _instead(fig, ax, "device memory not measured on CPU", out_dir, "vram_timeline")
    x = np.arange(len(rows))
    for key, style in (("allocated", "o-"), ("reserved", "s--"), ("peak", "^:"), ("peak_reserved", "v-.")):
        ax.plot(x, [np.nan if r[key] is None else r[key] / GB for r in rows], style, label=key)
    ax.axhline(share_gb, color="red", label=f"Flux share {share_gb:.1f} GB")
    ax.set_xticks(x, [r["phase"] for r in rows])
    ax.set_ylabel("GB")
    ax.legend()
    return _save(fig, out_dir, "vram_timeline")


def placements(table: list[dict], share_gb: float, out_dir=None):
    """Each placement measured in a fresh process: resident and peak GB beside the plan, and P50 latency."""
    rows = [r for r in table if "error" not in r]
    fig, (mem, lat) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(rows))
    names = [r["placement"] for r in rows]
    measured = rows and rows[0]["resident_gb"] is not None
    if measured:
        for i, (key, label) in enumerate((("resident_gb", "resident"), ("planned_resident_gb", "planned resident"),
                                          ("peak_reserved_gb", "peak reserved"), ("planned_peak_gb", "planned peak"))):
            mem.bar(x + i * 0.2, [r[key] for r in rows], 0.2, label=label)
        mem.axhline(share_gb, color="red", linestyle="--", label=f"Flux share {share_gb:.1f} GB")
        mem.set_xticks(x + 0.3, names)
        mem.set_ylabel("GB")
        mem.legend(fontsize=8)
    else:
        mem.text(0.5, 0.5, "device memory not measured on CPU", ha="center", va="center")
        mem.set_axis_off()
    lat.bar(names, [r["p50_s"] for r in rows])
    lat.set_ylabel("P50 seconds per image")
    return _save(fig, out_dir, "vram_placements")


def drift(profile: dict, budget_mb: float, out_dir=None):
    fig, ax = plt.subplots(figsize=(8, 3))
    values = profile["drift_allocated_bytes"]
    if not values:
        return _instead(fig, ax, "device memory not measured on CPU", out_dir, "vram_drift")
    ax.plot(np.arange(1, len(values) + 1), [(v - values[0]) / MB for v in values], "o-")
    for sign in (1, -1):
        ax.axhline(sign * budget_mb, color="red", linestyle="--")
    ax.set_xlabel("call")
    ax.set_ylabel("allocated vs first call (MB)")
    return _save(fig, out_dir, "vram_drift")


def latency_distribution(bench: dict, budget_s: float, out_dir=None):
    """Histogram and empirical CDF of total latency with percentile lines and the P99 budget."""
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    for label in ("plain", "true_cfg"):
        if label not in bench:
            continue
        totals = np.array([r["total"] for r in bench[label]["iterations"]])
        hist.hist(totals, bins=30, alpha=0.6, label=label)
        xs = np.sort(totals)
        cdf.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)
        s = bench[label]["summary"]["total"]
        for key, style in (("p50", "-"), ("p99", "--"), ("p99_9", ":")):
            cdf.axvline(s[key], linestyle=style, color="gray")
    slowest = max(r["total"] for series in ("plain", "true_cfg") if series in bench for r in bench[series]["iterations"])
    for ax in (hist, cdf):
        if budget_s <= 3 * slowest:
            ax.axvline(budget_s, color="red", label=f"P99 budget {budget_s} s (target GPU)")
        else:
            ax.set_title(f"P99 budget {budget_s} s (target GPU) is off this scale", fontsize=9)
        ax.set_xlabel("seconds per image")
        ax.legend()
    cdf.set_ylabel("fraction of calls")
    return _save(fig, out_dir, "latency_distribution")


def latency_trace(bench: dict, out_dir=None):
    """Per-iteration time by phase, outliers (above median + 5 MAD) marked."""
    rows = bench["plain"]["iterations"]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for phase in ("text_encode", "denoise", "decode", "copy"):
        values = np.array([r[phase] for r in rows])
        ax.bar(x, values, bottom=bottom, label=phase)
        bottom += values
    outliers = bench["plain"]["summary"]["total"]["outliers"]
    ax.scatter(outliers, [rows[i]["total"] for i in outliers], color="red", marker="x", zorder=3, label="outlier")
    ax.set_xlabel("iteration (after warm-up)")
    ax.set_ylabel("seconds")
    ax.legend()
    return _save(fig, out_dir, "latency_trace")


def reference_grid(images: list, results: list[dict], out_dir=None):
    """reference | current | |difference| heat map, one row per case."""
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3 * len(images)), squeeze=False)
    for row, ((name, current, reference), result) in enumerate(zip(images, results)):
        diff = (current - reference).abs().mean(dim=-1).numpy()
        for col, (img, title) in enumerate(((reference.numpy(), f"{name}: reference"), (current.numpy(), "current"),
                                            (diff, f"|diff| max {result['max_abs_diff']:.3f}"))):
            ax = axes[row][col]
            ax.imshow(img, cmap="magma" if col == 2 else None, vmin=0, vmax=1 if col < 2 else max(diff.max(), 1e-6))
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    return _save(fig, out_dir, "quality_grid")


def projection(estimate: dict, budget_s: float, out_dir=None):
    """Projected seconds per phase on each target GPU (an ESTIMATE), against the P99 budget."""
    fig, ax = plt.subplots(figsize=(10, 4))
    if not estimate.get("applicable"):
        return _instead(fig, ax, f"no projection: {estimate.get('reason')}", out_dir, "latency_projection")
    targets = list(estimate["projected_p50_s"])
    bottom = np.zeros(len(targets))
    for phase, row in estimate["phases"].items():
        values = np.array([row["projected_s"][t] for t in targets])
        ax.bar(targets, values, bottom=bottom, label=phase)
        bottom += values
    ax.scatter(targets, [estimate["projected_p99_s"][t] for t in targets], color="black", marker="_", s=400,
               label="projected P99", zorder=3)
    ax.axhline(budget_s, color="red", linestyle="--", label=f"P99 budget {budget_s} s (RTX 3060)")
    ax.set_ylabel("seconds per image (ESTIMATE)")
    ax.set_title(f"projected from {estimate['device_name']}; {estimate['placement']} placement", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "latency_projection")


def side_by_side(result: dict, out_dir=None):
    """Latency of each variant over the interleaved calls (box) with its P50."""
    fig, ax = plt.subplots(figsize=(8, 4))
    if not result.get("applicable"):
        return _instead(fig, ax, f"not run: {result.get('reason')}", out_dir, "latency_side_by_side")
    names = list(result["variants"])
    ax.boxplot([result["variants"][n]["times"] for n in names], labels=names, showfliers=True)
    ax.set_ylabel("seconds per image")
    ax.set_title(f"{result['iterations']} calls each, interleaved in {result['rounds']} rounds ({result['device']})",
                 fontsize=9)
    return _save(fig, out_dir, "latency_side_by_side")


def _sweep_figure(result: dict, size: tuple[float, float]):
    """The rows of a sweep that ran, and a figure for them."""
    fig, ax = plt.subplots(figsize=size)
    return [r for r in result["rows"] if "skipped" not in r], fig, ax


def sweep_pareto(result: dict, out_dir=None):
    """GPU memory against P50 latency for every variant, coloured by PSNR to bf16; the Pareto front joined."""
    rows, fig, ax = _sweep_figure(result, (9, 5))
    if not rows:
        return _instead(fig, ax, "no variant ran", out_dir, "sweep_pareto")
    memory = np.array([(r["peak_reserved_bytes"] or r["planned_resident_bytes"]) / GB for r in rows])
    latency = np.array([r["latency"]["p50"] for r in rows])
    fidelity = np.array([min(r.get("fidelity", {}).get("psnr_db", np.inf), 60.0) for r in rows])
    points = ax.scatter(memory, latency, c=fidelity, cmap="viridis", s=60, zorder=3)
    fig.colorbar(points, ax=ax, label="PSNR to bf16, dB (capped at 60)")
    for r, x, y in zip(rows, memory, latency):
        ax.annotate(r["variant"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((x, y) for x, y in zip(memory, latency)
                   if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in zip(memory, latency)))
    ax.plot(*zip(*front), "k--", linewidth=1, label="Pareto front")
    measured = rows[0]["peak_reserved_bytes"] is not None
    ax.set_xlabel("GPU GB: peak reserved" if measured else "GB: planned resident (device memory not measured here)")
    ax.set_ylabel("P50 seconds per image")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "sweep_pareto")


def sweep_weights(result: dict, out_dir=None):
    """Weight GB per component of every variant, stacked."""
    rows, fig, ax = _sweep_figure(result, (9, 4))
    if not rows:
        return _instead(fig, ax, "no variant ran", out_dir, "sweep_weights")
    names = [r["variant"] for r in rows]
    bottom = np.zeros(len(rows))
    for component in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        values = np.array([r["weights"][component] / GB for r in rows])
        ax.bar(names, values, bottom=bottom, label=component)
        bottom += values
    ax.set_ylabel("weights (GB)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "sweep_weights")


def standin(data: dict, analysis: dict, out_dir=None):
    """P50 and P99 against the SMs a run had: measured on slices of one GPU, and projected there from the whole
    card's run; beside the rest of Vortex where the co-tenancy check ran on a slice; the RTX 3060 derived from the
    8-SM slice (a stand-in measurement scaled). `analysis`: `fluxkit.lab.standin.analyse(data)`."""
    rows = analysis["check"]
    whole = data["full_card_bench"]["plain"]["summary"]["total"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sms = [r["sms"] for r in rows] + [data["total_sms"]]
    for key, style, label in (("p50", "o", "P50"), ("p99", "s", "P99")):
        ax.plot(sms, [r[f"measured_{key}_s"] for r in rows] + [whole[key]], style, label=f"{label} measured")
        ax.plot([r["sms"] for r in rows], [r[f"projected_{key}_s"] for r in rows], style + "--", fillstyle="none",
                label=f"{label} projected from the whole card")
    cards = [("", analysis["rtx3060"], 4)]
    if "beside_vortex" in analysis:
        run = analysis["beside_vortex"]
        ax.plot([run["sms"]] * 2, [run["measured"]["total"]["p50"], run["measured"]["total"]["p99"]], "D",
                fillstyle="none", label=f"P50 and P99 beside the rest of Vortex ({run['calls']} calls)")
        cards.append((" beside Vortex", run["rtx3060"], 3.6))
    for where, card, x in cards:
        for link, marker in zip(("PCIe 4.0 x16", "PCIe 3.0 x16"), ("*", "x")):
            low, high = card[link]["p99_spread_s"]
            ax.errorbar([x], [card[link]["p99_s"]], yerr=[[card[link]["p99_s"] - low], [high - card[link]["p99_s"]]],
                        fmt=marker, capsize=4, label=f"RTX 3060 P99 from {card['from_sms']} SMs{where} ({link}): "
                                                     "a stand-in scaled")
    ax.set_xscale("log", base=2)
    ax.set_xticks([4] + sms, ["3060"] + [str(s) for s in sms])
    ax.set_xlabel(f"SMs of the {data['full_card_bench']['model']['device_name']} (green context)")
    ax.set_ylabel("seconds per 512x512 image")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "standin")

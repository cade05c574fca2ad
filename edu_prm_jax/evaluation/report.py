"""Best-of-N result tables (markdown) and plots (PNG): accuracy vs N and accuracy vs generated tokens."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, tuple[float, float]]]:
    """runs: dicts with sampler, n, seed, tokens and per-selector accuracies -> mean/std per (sampler, n)."""
    grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in runs:
        grouped.setdefault((r["sampler"], r["n"]), []).append(r)
    out = {}
    for key, rs in sorted(grouped.items()):
        metrics = [k for k in rs[0] if k not in ("sampler", "n", "seed")]
        out[key] = {m: mean_std([r[m] for r in rs]) for m in metrics}
        out[key]["seeds"] = (len(rs), 0.0)
    return out


def _fmt(ms: tuple[float, float], pct: bool = True) -> str:
    m, s = ms
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.0f} ± {s:.0f}"


def bon_table(summary: Mapping[tuple[str, int], Mapping[str, tuple[float, float]]], selectors: Sequence[str]) -> str:
    head = ("| sampler | N | " + " | ".join(selectors)
            + " | candidates / question | distinct tokens / question | seeds |")
    lines = [head, "|" + "---|" * (len(selectors) + 5)]
    for (sampler, n), row in summary.items():
        cells = [_fmt(row[s]) for s in selectors]
        lines.append(f"| {sampler} | {n} | " + " | ".join(cells) + f" | {row['candidates'][0]:.1f} | "
                     f"{_fmt(row['tokens'], pct=False)} | {int(row['seeds'][0])} |")
    return "\n".join(lines)


def token_table(summary: Mapping[tuple[str, int], Mapping[str, tuple[float, float]]]) -> str:
    """Distinct tokens per question by sampler and N. A tree that could not fill its leaf budget also gets its
    ratio to HT at the same number of candidates: HT's tokens per sample times the tree's candidates."""
    nan = (float("nan"), 0.0)
    ns = sorted({n for _, n in summary})
    lines = ["| N | HT tokens | EDU candidates | EDU tokens | EDU / HT | EDU / HT, equal candidates | "
             "P-EDU candidates | P-EDU tokens | P-EDU / HT | P-EDU / HT, equal candidates |",
             "|" + "---|" * 10]
    for n in ns:
        ht = summary.get(("ht", n), {}).get("tokens", nan)[0]
        cells = [f"{n}", f"{ht:.0f}"]
        for sampler in ("edu", "p-edu"):
            row = summary.get((sampler, n), {})
            tokens, candidates = row.get("tokens", nan)[0], row.get("candidates", nan)[0]
            ratio = tokens / ht if ht else float("nan")
            equal_candidates = tokens / (ht / n * candidates) if ht and candidates else float("nan")
            cells += [f"{candidates:.1f}", f"{tokens:.0f}", f"{ratio:.2f}", f"{equal_candidates:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bon(summary: Mapping[tuple[str, int], Mapping[str, tuple[float, float]]], out_dir: storage.PathLike,
             selector: str, greedy_acc: float | None) -> list[epath.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = sorted({s for s, _ in summary})
    paths = []
    for xkey, fname, xlabel in (("n", "bon_accuracy_vs_n.png", "N (samples / leaf budget)"),
                                ("tokens", "bon_accuracy_vs_tokens.png", "distinct generated tokens per question")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for sampler in samplers:
            ns = sorted(n for s, n in summary if s == sampler)
            for sel, style in ((selector, "-o"), ("majority", "--s")):
                ys = np.array([summary[(sampler, n)][sel][0] for n in ns]) * 100
                es = np.array([summary[(sampler, n)][sel][1] for n in ns]) * 100
                xs = ns if xkey == "n" else [summary[(sampler, n)]["tokens"][0] for n in ns]
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{sampler} · {sel}")
        if greedy_acc is not None:
            ax.axhline(100 * greedy_acc, color="gray", ls=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = storage.as_path(out_dir) / fname
        png = io.BytesIO()  # rendered in memory, then written atomically (a gs:// out_dir included)
        fig.savefig(png, format="png", dpi=120)
        write_bytes_atomic(path, png.getvalue())
        plt.close(fig)
        paths.append(path)
    return paths


def write_bon_report(runs: Sequence[Mapping[str, Any]], out_dir: storage.PathLike, selectors: Sequence[str],
                     highlight: str, greedy_acc: float | None, notes: str = "") -> str:
    """Write results.json, report.md and the plots into out_dir (any storage path); returns the markdown."""
    out_dir = storage.as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    write_json_atomic(out_dir / "results.json", {"runs": list(runs), "greedy_accuracy": greedy_acc,
                                                 "summary": {f"{s}/{n}": v for (s, n), v in summary.items()}})
    plots = plot_bon(summary, out_dir, highlight, greedy_acc)
    md = ["## Best-of-N", "", f"Accuracy (%), mean ± std over seeds. Greedy: "
          f"{'n/a' if greedy_acc is None else f'{100 * greedy_acc:.1f}'}%.", "", bon_table(summary, selectors), "",
          "### Token cost", "", token_table(summary), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    if notes:
        md += ["", notes]
    text = "\n".join(md) + "\n"
    write_text_atomic(out_dir / "report.md", text)
    return text

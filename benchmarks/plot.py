"""Draws a benchmark run (the JSON of ``python -m benchmarks.run --json``) as
one panel per operator: each contender's speed relative to the unfused
``jnp`` composition per shape and device count (bars; 1.0 is the dashed
line), with its fraction of the dense fp32 GEMM ceiling as a dot. The grouped
matmul's panel compares against the dense batched einsum instead.

Needs matplotlib (``pip install -e ".[plot]"``); nothing else imports it.

    python -m benchmarks.run --plot docs/benchmarks.png
    python -m benchmarks.plot RUN.json docs/benchmarks.png
"""

from __future__ import annotations

import json
import sys

#: Bar colours per contender, the defaults first.
COLOURS = {
    "ffi": "#1f77b4",
    "xla": "#ff7f0e",
    "unfused jnp (again)": "#c7c7c7",
    "int8 dot_general": "#7f7f7f",
    "prescaled jnp": "#bcbd22",
    "ffi grouped matmul kernel": "#17becf",
    "ffi operator, 1 device": "#1f77b4",
    "xla operator, 1 device": "#ff7f0e",
    "lax.ragged_dot": "#d62728",
}


#: One panel: (title, case labels, {contender: ratios}, {contender: ceiling
#: fractions}, what the ratio is against).
Panel = tuple[str, list[str], dict[str, list], dict[str, list], str]


def _panel(title, rows, case, contender, baseline, ratio) -> Panel:
    """The panel of ``rows`` (benchmark rows, dicts): ``case(row)`` is a row's
    case label (the cases in first-seen order), ``row[contender]`` who ran it
    (the ``baseline`` rows are left out), ``row[ratio]`` its speed relative to
    the baseline and ``row["vs_ceiling"]`` its fraction of the fp32 ceiling;
    a contender without a row for a case has None there."""
    cases = list(dict.fromkeys(case(r) for r in rows))
    ratios: dict[str, list] = {}
    ceiling: dict[str, list] = {}
    for r in rows:
        if r[contender] == baseline:
            continue
        i = cases.index(case(r))
        ratios.setdefault(r[contender], [None] * len(cases))[i] = r[ratio]
        ceiling.setdefault(r[contender], [None] * len(cases))[i] = r["vs_ceiling"]
    return title, cases, ratios, ceiling, baseline


def _panels(run: dict) -> list[Panel]:
    """One panel per operator (against the unfused ``jnp`` composition), then
    the grouped matmul's (against the dense batched einsum) if the run has it."""
    by_op: dict[str, list[dict]] = {}
    for row in run["rows"]:
        by_op.setdefault(row["operator"], []).append(row)

    def operator_case(r):
        return f"{r['shape']}\n{r['dtype']} x{r['devices']}"

    panels = [
        _panel(op, rows, operator_case, "implementation", "unfused jnp", "vs_unfused")
        for op, rows in by_op.items()
    ]
    gmm = (run.get("expert_parallel") or {}).get("grouped_matmul") or []
    if gmm:
        panels.append(
            _panel(
                "grouped matmul (G = 8)",
                gmm,
                lambda r: f"{r['routing']}\n{r['dtype']}",
                "contender",
                "dense batched einsum",
                "vs_dense_einsum",
            )
        )
    return panels


def draw(run: dict, path: str) -> None:
    """Writes the figure of ``run`` (a benchmark JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(run)
    peaks = run.get("datasheet_peaks")
    dots = "vs datasheet peak" if peaks else "vs fp32 ceiling"
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.4 * len(panels)), squeeze=False)
    for ax, (title, cases, ratios, ceiling, base) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(ratios))
        for j, (name, values) in enumerate(ratios.items()):
            xs = [i + (j - (len(ratios) - 1) / 2) * width for i in range(len(cases))]
            colour = COLOURS.get(name)
            ax.bar(
                xs,
                [v if v is not None else 0 for v in values],
                width,
                label=name,
                color=colour,
            )
            ax.plot(
                xs,
                [v if v is not None else float("nan") for v in ceiling[name]],
                "o",
                color="black",
                markersize=3,
            )
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_ylabel(f"speed vs {base}\n(dots: {dots})", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper right", ncol=min(4, len(ratios)))
    if run.get("backend", "cpu") == "cpu":
        flags = " ".join(run.get("cpu_flags") or []) or "unknown"
        where = f"{run.get('cores')} cores, CPU flags: {flags}"
        ceiling = f"fp32 ceiling {run.get('ceiling_gflops') or 0:.0f} GFLOP/s"
    else:
        where = run.get("device_kind") or run["backend"]
        ceiling = f"bf16 dot {(run.get('bf16_dot_gflops') or 0) / 1e3:.0f} TFLOP/s"
    fig.suptitle(f"jax_mc2 on {where}; {ceiling}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m benchmarks.plot RUN.json OUT.png")
    with open(args[0]) as f:
        draw(json.load(f), args[1])


if __name__ == "__main__":
    main()

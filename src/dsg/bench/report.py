"""Reports: the printed tables, report.md / report.png of `dsg demo`, and compare.json's self-contained
report.html (a table per task, the trade-off plot of every swept configuration with the Pareto front, and the
generations). Plots need matplotlib (the `report` extra); without it they are left out."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..eval.prompt_level import describe as describe_prompt_level
from ..tables import pct, table
from .selection import forget_value


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def short_config(cfg: dict) -> str:
    skip = {"variant", "method", "layer", "batch_size", "max_length", "params"}
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(cfg.items()) if k not in skip
    )


# ---- dsg compare ---------------------------------------------------------------------------------------------


def _flops(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def table_rows(compare: dict) -> tuple[list[str], list[list[str]]]:
    methods = compare["methods"]
    forget_task, retain_tasks = compare["forget_task"], compare["retain_tasks"]
    header = (
        ["method", "chosen config", "qualified", f"{forget_task} acc %", f"{forget_task} base-correct %"]
        + [f"{t} %" for t in retain_tasks]
        + ["ppl change", "fit s", "fit FLOPs", "dominated by DSG (val)", "against DSG (test)"]
    )
    base = compare["base"]["test"]
    ppl = compare["base"]["perplexity"]
    rows = [
        ["base model", "-", "-", pct(base["forget_accuracy"]), pct(base["forget_accuracy_base_correct"])]
        + [pct(base["tasks"][t]["accuracy"]) for t in retain_tasks]
        + [f"ppl {ppl['perplexity']:.2f}" if ppl else "-", "-", "-", "-", "-"]
    ]
    for name, r in methods.items():
        t = r["test"]
        dom = r.get("dominated_by_dsg_validation")
        rows.append(
            [
                name,
                short_config(r["chosen"]["config"]),
                "yes" if r["chosen"]["qualified"] else "NO",
                pct(t["forget_accuracy"]),
                pct(t["forget_accuracy_base_correct"]),
            ]
            + [pct(t["retain"].get(k)) for k in retain_tasks]
            + [
                "-" if t["perplexity_change"] is None else f"{100 * t['perplexity_change']:+.2f}%",
                f"{r['fit_seconds']:.1f}",
                _flops(r["flops"]),
                "-" if dom is None else ("yes" if dom else "no"),
                r.get("test_vs_dsg", "-"),
            ]
        )
    return header, rows


DILUTION_HEADER = ["method", "gated % k=0", "k=100", "k=1000", "after k=1000", "chat k=1000",
                   "padding alone gated % k=1000",
                   "forget base-correct % k=1000", "benign mentions clamped %"]  # fmt: skip


def dilution_rows(compare: dict) -> list[list[str]]:
    """Gate recall against benign padding (forget test questions), per method with a dilution summary."""
    rows = []
    for name, r in compare["methods"].items():
        d = r["test"].get("dilution")
        if not d:
            continue

        def cell(key, field="gate_rate", d=d):
            return pct(d[key][field]) if key in d else "-"

        rows.append([name, cell("plain:0"), cell("plain:100"), cell("plain:1000"), cell("after:1000"),
                     cell("chat:1000"),
                     pct(d.get("plain:1000", {}).get("padding_gate_rate")),
                     cell("plain:1000", "accuracy_base_correct"), pct(d.get("mentions_gate_rate"))])  # fmt: skip
    return rows


def print_table(compare: dict) -> str:
    header, rows = table_rows(compare)
    lines = [table(header, rows), ""]
    dilution = dilution_rows(compare)
    if dilution:
        lines += ["dilution (forget test questions after k benign tokens):", table(DILUTION_HEADER, dilution), ""]
    ratio = compare.get("fit_time_ratio_rmu_over_dsg")
    if ratio is not None:
        lines.append(f"fit time RMU / DSG: {ratio:.2f}x (chosen configurations, same run)")
    lines.append(f"selection: {compare['selection_rule']}")
    if compare.get("failed_methods"):
        lines.append(f"every configuration failed for: {', '.join(compare['failed_methods'])} (see runs/)")
    unq = [m for m, r in compare["methods"].items() if not r["chosen"]["qualified"]]
    if unq:
        lines.append(
            f"no configuration met the retain threshold for: {', '.join(unq)} (their best-retain one is shown)"
        )
    return "\n".join(lines)


def plot_tradeoff(compare: dict, config) -> str | None:
    """The forget-vs-retain plot over every swept configuration (validation), as base64 PNG; None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    base = compare["base"]["validation"]
    base_retain = base["retain_pooled"] or 1.0
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "os^vDPX*"
    front = []
    for k, (name, r) in enumerate(compare["methods"].items()):
        xs, ys = [], []
        for s in r["sweep"]:
            x = s["validation"]["retain_pooled"] / base_retain
            y = forget_value(s["validation"], config.forget_metric)
            xs.append(x)
            ys.append(y)
            if s["on_pareto_front"]:
                front.append((x, y))
            if s["key"] == r["chosen"]["key"]:
                ax.scatter(
                    [x],
                    [y],
                    s=160,
                    marker=markers[k % len(markers)],
                    color=f"C{k}",
                    edgecolor="black",
                    linewidth=1.5,
                    zorder=4,
                )
        ax.scatter(xs, ys, s=40, marker=markers[k % len(markers)], color=f"C{k}", alpha=0.7, label=name, zorder=3)
    if front:
        front.sort(key=lambda p: (-p[0], p[1]))
        ax.scatter(
            [p[0] for p in front],
            [p[1] for p in front],
            s=320,
            facecolors="none",
            edgecolors="black",
            linewidths=1,
            zorder=5,
            label="Pareto front (all methods)",
        )
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, drawstyle="steps-post", zorder=2)
    ax.axvline(
        config.retain_threshold, color="grey", ls=":", lw=1, label=f"retain = {config.retain_threshold:g} x base"
    )
    ax.scatter([1.0], [forget_value(base, config.forget_metric)], marker="x", color="black", s=80, label="base model")
    ax.set_xlabel("pooled retain accuracy / base (validation)  →  better")
    ax.set_ylabel(f"forget accuracy ({config.forget_metric}, validation)  ↓ better")
    ax.set_title("Forget vs retain, every swept configuration (large = chosen)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
    ".gen{white-space:pre-wrap;font-family:monospace;font-size:12px}"
)
SWEEP_HEADER = ["method", "config", "forget %", "forget base-correct %", "retain pooled %", "fit s", "FLOPs", "",
                "Pareto front"]  # fmt: skip


def report_html(compare: dict, config) -> str:
    """A self-contained page: summary table, trade-off plot, a table per task, the sweep and the generations."""
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dsg compare</title><style>{_STYLE}</style></head>"
        "<body>",
        f"<h1>DSG against the unlearning baselines</h1><p>{e(compare['bench'])}; dsg {e(compare['dsg_version'])}; "
        f"budget {config.budget:g}; {compare['seconds']:.0f} s for this invocation.</p>",
        f"<p>Answers by {e(compare['scoring'])}. Selection rule: {e(compare['selection_rule'])}. Configurations "
        "are chosen on validation questions and reported on disjoint test questions.</p>",
        "<h2>Summary (test questions)</h2>",
        _html_table(*table_rows(compare)),
    ]
    ratio = compare.get("fit_time_ratio_rmu_over_dsg")
    if ratio is not None:
        parts.append(f"<p>Fit time RMU / DSG (chosen configurations): {ratio:.2f}x.</p>")
    png = plot_tradeoff(compare, config)
    if png:
        parts += ["<h2>Trade-off (validation)</h2>", f"<img alt='forget vs retain' src='data:image/png;base64,{png}'>"]
    dilution = dilution_rows(compare)
    if dilution:
        parts += [
            "<h2>Dilution (forget test questions after k benign tokens)</h2>",
            _html_table(DILUTION_HEADER, dilution),
        ]
    parts += _task_tables(compare) + ["<h2>Every swept configuration (validation)</h2>"]
    parts.append(_html_table(SWEEP_HEADER, _sweep_rows(compare)))
    parts += _generations(compare) + ["</body></html>"]
    return "\n".join(parts)


def _task_tables(compare: dict) -> list[str]:
    parts = ["<h2>Per task (test questions)</h2>"]
    base_tasks = compare["base"]["test"]["tasks"]
    for task in [compare["forget_task"]] + compare["retain_tasks"]:
        rows = [["base model", str(base_tasks[task]["n"]), pct(base_tasks[task]["accuracy"]), "100.0", "-"]]
        for name, r in compare["methods"].items():
            t = r["test"]["tasks"][task]
            rows.append([name, str(t["n"]), pct(t["accuracy"]), pct(t["accuracy_base_correct"]), pct(t["gate_rate"])])
        header = ["method", "n", "accuracy %", "on base-correct %", "gated %"]
        parts += [f"<h3>{html.escape(task)}</h3>", _html_table(header, rows)]
    return parts


def _sweep_rows(compare: dict) -> list[list[str]]:
    rows = []
    for name, r in compare["methods"].items():
        for s in r["sweep"]:
            v = s["validation"]
            chosen = "chosen" if s["key"] == r["chosen"]["key"] else ""
            rows.append([name, short_config(s["config"]), pct(v["forget_accuracy"]),
                         pct(v["forget_accuracy_base_correct"]), pct(v["retain_pooled"]), f"{s['fit_seconds']:.1f}",
                         _flops(s["flops"]), chosen, "yes" if s["on_pareto_front"] else ""])  # fmt: skip
    return rows


def _generations(compare: dict) -> list[str]:
    e = html.escape
    parts = ["<h2>Generations (greedy, chosen configurations)</h2>"]
    gens = {"base model": compare["base"]["generations"]} | {n: r["generations"] for n, r in compare["methods"].items()}
    for i, p in enumerate(compare["base"]["generations"]):
        parts.append(f"<h3>{e(p['role'])} ({e(p['domain'])}): {e(p['prompt'])}</h3>")
        rows = []
        for name, g in gens.items():
            if i < len(g):
                gate = "" if g[i].get("gated") is None else (" [gated]" if g[i]["gated"] else "")
                rows.append(f"<tr><td>{e(name)}{e(gate)}</td><td class='gen'>{e(g[i]['completion'])}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    return parts


# ---- dsg demo ------------------------------------------------------------------------------------------------


def demo_rows(results: dict) -> list[list[str]]:
    rows = []
    for role in ("forget", "retain"):
        for t in results[role]:
            rows.append(
                [
                    f"{t['task']} ({role})",
                    str(t["n"]),
                    pct(t["base_accuracy"]),
                    pct(t["guarded_accuracy"]),
                    f"{pct(t['guarded_accuracy_base_correct'])} (n={t['n_base_correct']})",
                    pct(t["gate_rate"]),
                    pct(t.get("clamped_rate")),  # results written before it was measured: "-"
                ]
            )
    p = results["perplexity"]
    rows.append(
        [
            "perplexity (held-out retain text)",
            str(p["windows"]),
            f"{p['base']:.3f}",
            f"{p['guarded']:.3f}",
            f"{100 * p['relative_change']:+.2f}%",
            "-",
            pct(p["gate_rate"]),
        ]
    )
    return rows


DEMO_HEADER = ["task", "n", "base acc %", "guarded acc %", "guarded on base-correct %", "gated %", "clamped at all %"]


def print_demo_table(results: dict) -> str:
    g = results["guardrail"]
    lines = [
        table(DEMO_HEADER, demo_rows(results)),
        "",
        f"guardrail: {len(g['features'])} latents at {g['hook']}, gate: {_gate(g)}, clamp -{g['clamp']:g} "
        f"({g['clamp_mode']})",
        *_detail_lines(results),
        "targets: " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}" for k, v in results["targets"].items()),
        "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results.get("seconds", {}).items()),
        "evaluate seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results.get("evaluate_seconds", {}).items()),
    ]
    return "\n".join(lines)


def _gate(g: dict) -> str:
    """The gate in words (results written before the gate was recorded name only the paper's rule)."""
    return g.get("gate") or f"whole-input rho > {g['threshold']:.4f}"


def _detail_lines(results: dict) -> list[str]:
    """The lines after the guardrail's: its prompt-level check, fluency, chat requests and dilution."""
    d = results.get("dilution") or {}
    flu = results.get("fluency")
    check = describe_prompt_level(results["guardrail"].get("prompt_level_check"))
    lines = [check] if check else []
    if flu:
        b, g = flu["base"], flu["guarded"]
        lines.append(
            f"fluency of answers to forget prompts (base -> guarded): repeated 3-grams {pct(b['repeated_3gram'])}% -> "
            f"{pct(g['repeated_3gram'])}%, distinct-2 {pct(b['distinct_2'])}% -> {pct(g['distinct_2'])}%, "
            f"perplexity under the base model {b['base_perplexity']:.1f} -> {g['base_perplexity']:.1f}"
        )
    req = results.get("requests_gate_rate")
    if req:
        lines.append("held-out chat requests gated (the forget domain's: recall; the others': false positives): "
                     + ", ".join(f"{name} {pct(rate)}%" for name, rate in req.items()))  # fmt: skip
    if "plain:1000" not in d:
        return lines
    p, chat, after = d["plain:1000"], d.get("chat:1000") or {}, d.get("after:1000") or {}
    return lines + [
        f"dilution: after 1,000 benign tokens the gate opens on {pct(p['gate_rate'])}% of forget questions "
        f"({pct(d['plain:0']['gate_rate'])}% with none; asked first and padded after, the answer is guarded for "
        f"{pct(after.get('gate_rate'))}%; chat form {pct(chat.get('gate_rate'))}%; the paddings alone "
        f"{pct(p.get('padding_gate_rate'))}%, clamped anywhere in {pct(p.get('padding_touched_rate'))}%), forget "
        f"accuracy on its base-correct subset {pct(p['accuracy_base_correct'])}% (n={p['n_base_correct']}); benign "
        f"text mentioning a security term clamped {pct(d.get('mentions_gate_rate'))}%"
    ]


def report_markdown(results: dict, plotted: bool) -> str:
    rows = demo_rows(results)
    md = [
        "# dsg demo",
        "",
        f"Model `{results['model']}`, dsg {results['dsg_version']}.",
        "",
        "| " + " | ".join(DEMO_HEADER) + " |",
        "|" + "---|" * len(DEMO_HEADER),
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    g = results["guardrail"]
    md += [
        "",
        f"Guardrail: latents {g['features']} at `{g['hook']}`; gate: {_gate(g)}; clamp -{g['clamp']:g} "
        f"({g['clamp_mode']}).",
        *[part for line in _detail_lines(results) for part in ("", line + ".")],
        "",
        "## Targets",
        "",
    ]
    md += [
        f"- {k}: {v['value'] if not isinstance(v['value'], float) else round(v['value'], 4)} "
        f"({'met' if v['met'] else 'missed'})"
        for k, v in results["targets"].items()
    ]
    if plotted:
        md += ["", "![accuracy and gate](report.png)"]
    return "\n".join(md) + "\n"


def plot_demo(path: Path, forget_tasks, retain_tasks, guard) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    tasks = forget_tasks + retain_tasks
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(tasks))
    ax1.bar([i - 0.2 for i in x], [t["base_accuracy"] for t in tasks], 0.4, label="base")
    ax1.bar([i + 0.2 for i in x], [t["guarded_accuracy"] for t in tasks], 0.4, label="guarded")
    ax1.axhline(0.25, color="grey", ls=":", lw=1, label="chance")
    ax1.set_xticks(list(x), [t["task"] + ("\n(forget)" if t in forget_tasks else "\n(retain)") for t in tasks])
    ax1.set_ylabel("accuracy (test questions)")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax2.bar([t["task"] for t in tasks], [t["gate_rate"] for t in tasks], color=["C3"] + ["C2"] * len(retain_tasks))
    ax2.set_ylabel("share of questions gated")
    ax2.set_ylim(0, 1)
    ax2.set_title("gate: " + ("detector" if guard.detector is not None else f"rho > {guard.threshold:.3f}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Run report: plots and a self-contained HTML page from a run's ``metrics.json``.

A run directory ``DIR`` holds ``DIR/metrics.json`` (contract in docs/architecture.md).
``write_report`` writes ``DIR/report.html`` (inline CSS, plots embedded as base64 PNG data
URIs, no external references of any kind) and
``DIR/plots/{accuracy,epsilon,bytes,excluded}.png``.
``format_summary_table`` renders the same numbers as plain text for the terminal.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from silotune.files import atomic_write_text

NON_PRIVATE_LABEL = "NON-PRIVATE (epsilon = inf)"
NO_DP_TEXT = "non-private run: no DP guarantee"
PLOT_NAMES = ("accuracy", "epsilon", "bytes", "excluded")
MAX_SILO_LINES = 12  # more silos: the epsilon plot shows their range, not one line each
# The page may load nothing from anywhere: only its own inline style and script, and
# images from data: URIs (a viewer that honours CSP cannot make a network request).
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")
# After load, mark each plot with its rendered size and the body with the number of
# plots drawn, so a headless browser test can check that every plot rendered.
_RENDER_CHECK = """<script>window.addEventListener("load",function(){var n=0;
document.querySelectorAll("img").forEach(function(i){var ok=i.complete&&i.naturalWidth>0;
i.setAttribute("data-rendered",ok?i.naturalWidth+"x"+i.naturalHeight:"no");if(ok)n++;});
document.body.setAttribute("data-plots-rendered",String(n));});</script>"""
_ROUND_HEADER = ["round", "accuracy", "loss", "eps max", "eps min", "bytes up", "bytes down",
                 "seconds", "excluded"]
_ROUND_NUMBERS = ("accuracy", "loss", "bytes_up", "bytes_down", "seconds")
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#b00020;color:#fff;font-size:1.4em;font-weight:bold;padding:.6em 1em}
.private{color:#0a6b2b;font-weight:bold}img{max-width:100%}figure{margin:1em 0}"""


def _cfg(config: dict[str, Any], key: str) -> Any:
    """Look a config key up in snake_case, falling back to the kebab-case spelling."""
    return config.get(key, config.get(key.replace("_", "-")))


def _number(value: Any, where: str) -> float:
    """Return ``value`` as a float, or raise ValueError naming ``where``."""
    if value is None:
        raise ValueError(f"{where} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _silo_map(value: Any, where: str) -> dict[str, float]:
    """Validate a ``{"<silo>": float}`` map (``None`` counts as empty)."""
    if not isinstance(value, dict | None):
        raise ValueError(f"{where} must be an object mapping silo to number")
    return {str(k): _number(v, f"{where}[{k!r}]") for k, v in (value or {}).items()}


def validate_metrics(data: Any, source: str = "metrics") -> dict[str, Any]:
    """Check ``data`` against the metrics.json contract and return a normalised copy.

    Optional fields get defaults: ``base_loss`` -> NaN, ``epsilon``/``epsilon_limit``/
    ``noise_multiplier`` -> {} (older metrics files have no noise multiplier), ``excluded``
    -> [], ``private`` -> inferred from ``config["target_epsilon"] != "inf"``.
    Raises ValueError whose message starts with ``source``.
    """
    try:
        if not isinstance(data, dict):
            raise ValueError("top level must be a JSON object")
        config = data.get("config")
        if not isinstance(config, dict):
            raise ValueError('"config" must be an object')
        if not isinstance(data.get("rounds"), list):
            raise ValueError('"rounds" must be a list')
        target = _cfg(config, "target_epsilon")
        private = data.get("private", target is not None and str(target) != "inf")
        if not isinstance(private, bool):
            raise ValueError('"private" must be true or false')
        base_loss = data.get("base_loss")
        rounds: list[dict[str, Any]] = []
        for i, raw in enumerate(data["rounds"]):
            where = f"rounds[{i}]"
            if not isinstance(raw, dict):
                raise ValueError(f"{where} must be an object")
            row: dict[str, Any] = {k: _number(raw.get(k), f"{where}.{k}")
                                   for k in ("round", *_ROUND_NUMBERS)}
            row["round"] = int(row["round"])
            row["bytes_up"], row["bytes_down"] = int(row["bytes_up"]), int(row["bytes_down"])
            row["epsilon"] = _silo_map(raw.get("epsilon"), f"{where}.epsilon")
            row["epsilon_limit"] = _silo_map(raw.get("epsilon_limit"), f"{where}.epsilon_limit")
            row["noise_multiplier"] = _silo_map(raw.get("noise_multiplier"),
                                                f"{where}.noise_multiplier")
            excluded = raw.get("excluded") or []
            if not isinstance(excluded, list) or not all(isinstance(e, dict) and "silo" in e
                                                         for e in excluded):
                raise ValueError(f'{where}.excluded must be a list of {{"silo", "reason"}}')
            row["excluded"] = [{"silo": str(e["silo"]), "reason": str(e.get("reason", ""))}
                               for e in excluded]
            rounds.append(row)
        return {"config": dict(config), "private": private, "rounds": rounds,
                "base_accuracy": _number(data.get("base_accuracy"), "base_accuracy"),
                "base_loss": math.nan if base_loss is None else _number(base_loss, "base_loss"),
                "client_level_dp": data.get("client_level_dp"),
                "best_round": _best(data.get("best_round")),
                "warnings": [str(w) for w in data.get("warnings") or []]}
    except ValueError as exc:
        raise ValueError(f"{source}: invalid metrics: {exc}") from exc


def _best(raw: Any) -> int | None:
    """The best round's number (0: the base model); None for metrics without one."""
    return int(_number(raw.get("round"), "best_round.round")) if isinstance(raw, dict) else None


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read and validate ``run_dir/metrics.json``; ValueError names the file on any problem."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found (did the run finish writing it?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    return validate_metrics(data, str(path))


def _silos(rounds: list[dict[str, Any]]) -> list[str]:
    """All silo names that report an epsilon or a limit in any round, sorted."""
    return sorted({s for r in rounds for s in (*r["epsilon"], *r["epsilon_limit"])})


def _plot_accuracy(fig: Figure, m: dict[str, Any]) -> None:
    """Accuracy and loss per round; round 0 is the base model, dashed line at its value."""
    xs = [0] + [r["round"] for r in m["rounds"]]
    for ax, key in zip(fig.subplots(1, 2), ("accuracy", "loss"), strict=True):
        base = m[f"base_{key}"]
        ax.plot(xs, [base] + [r[key] for r in m["rounds"]], marker="o", label=key)
        if not math.isnan(base):
            ax.axhline(base, linestyle="--", color="grey", label=f"base {key}")
        ax.set(xlabel="round (0 = base model)", ylabel=key, title=f"held-out {key}")
        ax.legend()


def _plot_epsilon(fig: Figure, m: dict[str, Any]) -> None:
    """Cumulative epsilon per silo over rounds, with a dashed line at each silo's limit.

    Beyond MAX_SILO_LINES silos, one line per silo is unreadable: the plot shows the
    largest, median and smallest epsilon over the silos that have trained, and the
    smallest limit.
    """
    ax = fig.subplots()
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="privacy budget per silo")
    silos = _silos(m["rounds"])
    if not m["private"] or not silos:
        text = NO_DP_TEXT if not m["private"] else "no epsilon reported"
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, transform=ax.transAxes)
        ax.set_axis_off()
        return
    if len(silos) > MAX_SILO_LINES:
        rows = [r for r in m["rounds"] if r["epsilon"]]
        xs = [r["round"] for r in rows]
        values = [sorted(r["epsilon"].values()) for r in rows]
        ax.fill_between(xs, [v[0] for v in values], [v[-1] for v in values], alpha=0.25,
                        label=f"min to max over {len(silos)} silos")
        ax.plot(xs, [v[len(v) // 2] for v in values], marker="o", label="median silo")
        limits = [(r["round"], min(r["epsilon_limit"].values())) for r in m["rounds"]
                  if r["epsilon_limit"]]
        if limits:
            ax.plot(*zip(*limits, strict=True), linestyle="--", color="C3",
                    label="smallest limit")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        return
    shared = {v for r in m["rounds"] for v in r["epsilon_limit"].values()}
    for i, silo in enumerate(silos):
        color = f"C{i % 10}"
        pts = [(r["round"], r["epsilon"][silo]) for r in m["rounds"] if silo in r["epsilon"]]
        lim = [(r["round"], r["epsilon_limit"][silo]) for r in m["rounds"]
               if silo in r["epsilon_limit"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=silo)
        if lim and len(shared) > 1:
            ax.plot(*zip(*lim, strict=True), linestyle="--", color=color, label=f"{silo} limit")
    if len(shared) == 1:  # one limit for every silo: one line
        ax.axhline(shared.pop(), linestyle="--", color="grey", label="limit (every silo)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))


def _plot_bytes(fig: Figure, m: dict[str, Any]) -> None:
    """Bytes sent up (silos to server) and down (server to silos) per round."""
    ax = fig.subplots()
    xs = [r["round"] for r in m["rounds"]]
    ax.bar([x - 0.2 for x in xs], [r["bytes_up"] for r in m["rounds"]], 0.4, label="up")
    ax.bar([x + 0.2 for x in xs], [r["bytes_down"] for r in m["rounds"]], 0.4, label="down")
    ax.set(xlabel="round", ylabel="bytes", title="bytes transferred per round")
    ax.legend()


def exclusion_cause(reason: str) -> str:
    """Short cause of an exclusion for the legend: the error type or first clause
    (``"BudgetExhausted: ..."`` -> ``"BudgetExhausted"``)."""
    head = reason.split(":", 1)[0].strip() or "unknown"
    return head if len(head) <= 40 else head[:39] + "…"


def _plot_excluded(fig: Figure, m: dict[str, Any]) -> None:
    """Silos excluded from aggregation per round, stacked by cause."""
    ax = fig.subplots()
    xs = [r["round"] for r in m["rounds"]]
    causes = sorted({exclusion_cause(e["reason"]) for r in m["rounds"] for e in r["excluded"]})
    bottom = [0] * len(xs)
    for i, cause in enumerate(causes):
        counts = [sum(exclusion_cause(e["reason"]) == cause for e in r["excluded"])
                  for r in m["rounds"]]
        ax.bar(xs, counts, bottom=bottom, color=f"C{(i + 3) % 10}", label=cause)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    if causes:
        ax.legend(fontsize="small", title="why")
    else:
        ax.text(0.5, 0.5, "no silo excluded", ha="center", va="center", fontsize=14,
                transform=ax.transAxes)
    ax.set(xlabel="round", ylabel="silos excluded", title="excluded silos per round, by cause")
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.set_ylim(bottom=0, top=max(1, *bottom) * 1.15 if bottom else 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _render_png(plot: Any, m: dict[str, Any], path: Path) -> bytes:
    """Draw one plot on a fresh Agg figure (no pyplot state), save it to ``path``, return bytes."""
    wide = plot in (_plot_accuracy, _plot_epsilon)  # two panels; a legend at the side
    fig = Figure(figsize=(10, 4) if wide else (7, 4), layout="tight")
    FigureCanvasAgg(fig)
    plot(fig, m)
    for ax in fig.axes:  # rounds are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell is escaped, numeric cells are right-aligned."""
    def cell(v: Any) -> str:
        cls = ' class="n"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
        return f"<td{cls}>{html.escape(_fmt(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def _fmt(v: Any) -> str:
    """Format a value for display: floats to 4 significant digits, ints with separators."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def _round_rows(m: dict[str, Any]) -> list[list[Any]]:
    """Rows "base" + one per round: acc, loss, eps max/min, bytes up/down, seconds, excluded."""
    best = m.get("best_round")
    rows: list[list[Any]] = [["base*" if best == 0 else "base", m["base_accuracy"],
                              m["base_loss"], *["-"] * 6]]
    for r in m["rounds"]:
        eps = list(r["epsilon"].values()) or ["-"]
        rows.append([f"{r['round']}*" if r["round"] == best else r["round"], r["accuracy"],
                     r["loss"], max(eps), min(eps), r["bytes_up"], r["bytes_down"],
                     r["seconds"], len(r["excluded"])])
    return rows


def _final_budget(m: dict[str, Any]) -> list[list[Any]]:
    """Per silo: [silo, final epsilon, limit, noise multiplier], each from the latest round
    reporting it ("-" when none does, e.g. a metrics file older than the noise multiplier)."""
    out = []
    for silo in _silos(m["rounds"]):
        latest = [[r[key][silo] for r in m["rounds"] if silo in r[key]]
                  for key in ("epsilon", "epsilon_limit", "noise_multiplier")]
        out.append([silo, *(values[-1] if values else "-" for values in latest)])
    return out


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/plots/*.png`` from ``run_dir/metrics.json``.

    Returns the path of the HTML report. Raises ValueError if metrics.json is missing or
    does not follow the contract.
    """
    m = load_metrics(run_dir := Path(run_dir))
    (plots_dir := run_dir / "plots").mkdir(parents=True, exist_ok=True)
    imgs = {n: _render_png(p, m, plots_dir / f"{n}.png") for n, p in zip(
        PLOT_NAMES, (_plot_accuracy, _plot_epsilon, _plot_bytes, _plot_excluded), strict=True)}
    cfg = m["config"]
    final = m["rounds"][-1]["accuracy"] if m["rounds"] else m["base_accuracy"]
    privacy = ('<span class="private">private (differentially private training)</span>'
               if m["private"] else "<strong>NON-PRIVATE</strong>")
    rows = [("accuracy", f"{_fmt(m['base_accuracy'])} (base) → {_fmt(final)} (final)"),
            *([("best round", f"{m['best_round']} (marked *)")]
              if m["best_round"] is not None else []),
            *(("warning", w) for w in m["warnings"]),
            ("rounds", str(len(m["rounds"]))),
            *((k.replace("_", " "), _fmt(_cfg(cfg, k)))
              for k in ("strategy", "target_epsilon", "target_delta"))]
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>\n"
                      for k, v in rows) + f"<tr><th>privacy</th><td>{privacy}</td></tr>\n"
    title = f"silotune run report: {run_dir.resolve().name}"
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
             f"<title>{html.escape(title)}</title><style>{_CSS}</style>{_RENDER_CHECK}"
             "</head><body>\n"
             f"<h1>{html.escape(title)}</h1>\n"]
    if not m["private"]:
        parts.append(f'<div class="banner">{html.escape(NON_PRIVATE_LABEL)}: '
                     "no differential privacy guarantee for any silo</div>\n")
    parts += [f"<h2>Summary</h2>\n<table>{summary}</table>\n<h2>Config</h2>\n",
              _table(["key", "value"], [[str(k), v if isinstance(v, str) else json.dumps(v)]
                                        for k, v in sorted(cfg.items())]),
              "<h2>Plots</h2>\n"]
    for name in PLOT_NAMES:
        data = base64.b64encode(imgs[name]).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(name)} plot"><figcaption>{html.escape(name)}'
                     "</figcaption></figure>\n")
        if name == "epsilon" and m["private"]:
            parts.append(_table(["silo", "final epsilon", "limit", "noise multiplier"],
                                _final_budget(m)))
            parts += [f"<p>{html.escape(line)}</p>\n"
                      for line in client_level_lines(m["client_level_dp"])]
        if name == "excluded":
            excl = [[r["round"], e["silo"], e["reason"]] for r in m["rounds"]
                    for e in r["excluded"]]
            parts.append(_table(["round", "silo", "reason"], excl) if excl
                         else "<p>No silo was excluded.</p>\n")
    parts += ["<h2>Rounds</h2>\n", _table(_ROUND_HEADER, _round_rows(m)), "</body></html>\n"]
    out = run_dir / "report.html"
    atomic_write_text(out, "".join(parts))
    return out


def format_summary_table(metrics: dict[str, Any]) -> str:
    """Plain-text summary: one row for the base model and one per round, then per-silo budget.

    Columns: accuracy, loss, max/min epsilon over silos, bytes up/down, seconds, excluded
    count; per silo, its final epsilon, limit and latest DP-SGD noise multiplier. Non-private
    runs are labelled ``NON-PRIVATE (epsilon = inf)``.
    """
    m = validate_metrics(metrics)
    cfg = m["config"]
    head = (NON_PRIVATE_LABEL if not m["private"] else
            f"private (target epsilon = {_fmt(_cfg(cfg, 'target_epsilon'))}, "
            f"delta = {_fmt(_cfg(cfg, 'target_delta'))})")
    rows = [_ROUND_HEADER] + [[_fmt(v) for v in row] for row in _round_rows(m)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_ROUND_HEADER))]
    lines = [f"strategy: {_fmt(_cfg(cfg, 'strategy'))}   {head}"]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if (best := m["best_round"]) is not None:
        lines.append(f"best: {f'round {best}' if best else 'the base model'} (marked *)")
    lines += [f"WARNING: {w}" for w in m["warnings"]]
    lines.append("final epsilon / limit per silo (and its latest noise multiplier):"
                 if m["private"] else f"final epsilon per silo: none ({NO_DP_TEXT})")
    lines += [f"  {s}: {_fmt(e)} / {_fmt(lim)}"
              + ("" if sigma == "-" else f", noise multiplier {_fmt(sigma)}")
              for s, e, lim, sigma in _final_budget(m)]
    lines += client_level_lines(m["client_level_dp"])
    return "\n".join(lines)


def client_level_lines(dp: Any) -> list[str]:
    """Summary of client-level DP (unit = silo), kept apart from record-level epsilon."""
    if not isinstance(dp, dict):
        return []
    return [f"client-level DP (unit = one silo; a separate guarantee, not added to the "
            f"epsilons above): epsilon {_fmt(dp.get('epsilon'))} at delta "
            f"{_fmt(dp.get('delta'))} ({dp.get('accountant')}) after {dp.get('releases')} "
            f"noisy rounds, z = {_fmt(dp.get('noise_multiplier'))}, "
            f"C = {_fmt(dp.get('clip_norm'))}, {dp.get('per_round')} of "
            f"{dp.get('population')} silos per round"]

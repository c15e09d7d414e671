"""eval.py's reports: Markdown and LaTeX tables, JSON, CSV, per-image CSV and curve figures.

One method gives the single-method layouts (a row per dataset). Several methods give a table per
dataset with a row per method, the best value of each column in bold and the second underlined
(direction-aware: MAE and HCE lower is better), a LaTeX table with a column group per dataset, JSON
`{method: {dataset: {...}}}`, CSVs with a `method` column and one figure per dataset and curve kind
holding every method's curve.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_path, os_reason

LOWER_IS_BETTER = frozenset({"MAE", "HCE"})
Rows = Mapping[str, Mapping[str, Any]]  # dataset -> {metric: value, "n": images}
MethodRows = Mapping[str, Rows]  # method -> Rows


# LaTeX's special characters in text mode and what typesets each as itself.
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """`text` (a method or dataset name) typeset as written inside a LaTeX table."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def markdown_escape(text: str) -> str:
    """`text` as one Markdown table cell: a `|` would start another column."""
    return text.replace("|", "\\|")


def _format(metric: str, value: float, digits: int) -> str:
    """A table cell: HCE as a whole number (as the field prints it), the others with `digits` decimals."""
    return f"{value:.0f}" if metric == "HCE" else f"{value:.{digits}f}"


def rank_marks(values: Mapping[str, float], metric: str, digits: int) -> dict[str, str]:
    """'best' / 'second' / '' per method for one column, compared as printed.

    Ties share a mark and count as places (competition ranking): two best values leave no second.
    """
    sign = 1 if metric in LOWER_IS_BETTER else -1
    shown = {name: sign * float(_format(metric, value, digits)) for name, value in values.items() if np.isfinite(value)}
    if len(values) < 2:
        return {name: "" for name in values}
    place = {name: 1 + sum(other < v for other in shown.values()) for name, v in shown.items()}
    return {name: {1: "best", 2: "second"}.get(place.get(name, 0), "") for name in values}


def _marked(text: str, mark: str, bold: Callable[[str], str], underline: Callable[[str], str]) -> str:
    """A cell's text with its mark applied."""
    return bold(text) if mark == "best" else underline(text) if mark == "second" else text


def markdown_table(rows: Rows, metrics: Sequence[str], digits: int = 3) -> str:
    """One method's rows as a Markdown table, one row per dataset."""
    lines = ["| Dataset | " + " | ".join(metrics) + " |", "|:--|" + "--:|" * len(metrics)]
    lines += [f"| {markdown_escape(name)} | " + " | ".join(_format(m, row[m], digits) for m in metrics) + " |"
              for name, row in rows.items()]
    return "\n".join(lines)


def datasets_of(tables: MethodRows) -> list[str]:
    """Every dataset any method has, in first-seen order."""
    return list(dict.fromkeys(name for rows in tables.values() for name in rows))


def comparison_markdown(tables: MethodRows, metrics: Sequence[str], digits: int = 3,
                        expected_n: Mapping[str, int] | None = None) -> str:
    """Per dataset, a Markdown table with a row per method; best bold, second underlined.

    `expected_n`: images per dataset; a method evaluated on fewer is shown with its count.
    """
    blocks = []
    for dataset in datasets_of(tables):
        present = {method: rows[dataset] for method, rows in tables.items() if dataset in rows}
        marks = {m: rank_marks({k: row[m] for k, row in present.items()}, m, digits) for m in metrics}
        lines = [f"{dataset}", "", "| Method | " + " | ".join(metrics) + " |", "|:--|" + "--:|" * len(metrics)]
        for method, row in present.items():
            total = (expected_n or {}).get(dataset)
            label = method if total is None or row["n"] == total else f"{method} ({row['n']}/{total} images)"
            cells = [_marked(_format(m, row[m], digits), marks[m][method],
                             lambda t: f"**{t}**", lambda t: f"<u>{t}</u>")
                     for m in metrics]
            lines.append(f"| {markdown_escape(label)} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _arrow(metric: str) -> str:
    """The LaTeX arrow saying which direction is better."""
    return f"{metric}$\\{'downarrow' if metric in LOWER_IS_BETTER else 'uparrow'}$"


def latex_table(rows: Rows, metrics: Sequence[str], digits: int = 3) -> str:
    """One method's rows as a booktabs LaTeX tabular, with arrows for better direction."""
    header = " & ".join(_arrow(m) for m in metrics)
    body = [f"{latex_escape(name)} & " + " & ".join(_format(m, row[m], digits) for m in metrics) + r" \\"
            for name, row in rows.items()]
    return "\n".join([f"\\begin{{tabular}}{{l{'c' * len(metrics)}}}", r"\toprule", f"Dataset & {header} \\\\",
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def comparison_latex(tables: MethodRows, metrics: Sequence[str], digits: int = 3) -> str:
    """A paper table: a row per method, a column group per dataset, best \\textbf, second \\underline."""
    datasets = datasets_of(tables)
    k = len(metrics)
    groups = " & ".join(f"\\multicolumn{{{k}}}{{c}}{{{latex_escape(d)}}}" for d in datasets)
    rules = " ".join(f"\\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(datasets)))
    header = " & ".join(_arrow(m) for _ in datasets for m in metrics)
    marks = {(d, m): rank_marks({meth: rows[d][m] for meth, rows in tables.items() if d in rows}, m, digits)
             for d in datasets for m in metrics}
    body = []
    for method, rows in tables.items():
        cells = [_marked(_format(m, rows[d][m], digits), marks[d, m][method], lambda t: f"\\textbf{{{t}}}",
                         lambda t: f"\\underline{{{t}}}") if d in rows else "--" for d in datasets for m in metrics]
        body.append(f"{latex_escape(method)} & " + " & ".join(cells) + r" \\")
    return "\n".join([f"\\begin{{tabular}}{{l{'c' * k * len(datasets)}}}", r"\toprule", f" & {groups} \\\\", rules,
                      f"Method & {header} \\\\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_text(text: str, path: Path) -> None:
    """`text` written to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Rows ({dataset: ...} or {method: {dataset: ...}}) with every metric at full precision."""
    write_text(json.dumps(data, indent=1) + "\n", path)


def _metric_columns(tables: MethodRows) -> list[str]:
    """Every metric name in the rows, in first-seen order."""
    return list(dict.fromkeys(k for rows in tables.values() for row in rows.values() for k in row if k != "n"))


def write_csv(tables: MethodRows, path: Path, with_method: bool) -> None:
    """One line per (method,) dataset: [method,] dataset, n and every metric at full precision."""
    metrics = _metric_columns(tables)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(["method"] if with_method else []), "dataset", "n", *metrics])
        for method, rows in tables.items():
            writer.writerows([*([method] if with_method else []), name, row["n"], *(repr(row[m]) for m in metrics)]
                             for name, row in rows.items())


def write_per_image_csv(images: Mapping[str, Mapping[str, list[dict[str, Any]]]], path: Path,
                        with_method: bool) -> None:
    """One line per image: [method,] dataset, stem, MAE, HCE, the other metrics on that image alone, resized_from."""
    every = [k for per in images.values() for ims in per.values() for im in ims[:1] for k in im]
    others = [k for k in dict.fromkeys(every) if k not in ("image", "MAE", "HCE", "resized_from")]
    columns = ["MAE", "HCE", *others]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(["method"] if with_method else []), "dataset", "image", *columns, "resized_from"])
        for method, per in images.items():
            for name, ims in per.items():
                writer.writerows([*([method] if with_method else []), name, im["image"],
                                  *(repr(im[m]) for m in columns), im["resized_from"]] for im in ims)


def save_plots(curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], tables: MethodRows,
               plot_dir: Path) -> list[Path]:
    """`<dataset>_pr.png` and `<dataset>_fmeasure.png` per dataset, one labelled curve per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for dataset in datasets_of(curves):  # evaluated datasets only: the DIS-TE (1-4) row has no curves
        methods = [m for m in curves if dataset in curves[m]]
        single = len(tables) == 1
        for suffix, xkey, ykey, xlabel, ylabel in (("pr", "recall", "precision", "Recall", "Precision"),
                                                   ("fmeasure", "threshold", "fmeasure", "Threshold",
                                                    "F-measure (beta^2 = 0.3)")):
            fig = Figure(figsize=(5, 4), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            for method in methods:
                c, row = curves[method][dataset], tables[method][dataset]
                ax.plot(c[xkey], c[ykey], label=f"{method} (maxF {row['maxF']:.3f})")
            x = curves[methods[0]][dataset][xkey]
            if single and suffix == "fmeasure":
                row = tables[methods[0]][dataset]
                title = f"{dataset}: maxF {row['maxF']:.3f}, meanF {row['meanF']:.3f}"
            else:
                title = f"{dataset}: {'PR curve' if suffix == 'pr' else 'F-measure vs threshold'}"
            ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(x.min(), x.max()), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            if not single:
                ax.legend(fontsize=8, loc="lower left" if suffix == "pr" else "best")
            fig.tight_layout()
            path = Path(plot_dir) / f"{dataset}_{suffix}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            written.append(path)
    return written


def write_reports(results: Mapping[str, Mapping[str, Any]], tables: MethodRows, metrics: Sequence[str],
                  digits: int, json_path: Path | None = None, csv_path: Path | None = None,
                  latex_path: Path | None = None, per_image_path: Path | None = None,
                  plot_dir: Path | None = None) -> list[str]:
    """Write the requested files from {method: {dataset: DatasetResult}} (single-method layouts for one method).

    Each output is tried whatever happened to the others; returns one line per output that could not be written.
    """
    single = len(tables) == 1
    only = next(iter(tables.values()))
    images = {m: {d: r.images for d, r in per.items()} for m, per in results.items()}
    curves = {m: {d: r.curves for d, r in per.items()} for m, per in results.items()}
    writers = [(json_path, lambda p: write_json(only if single else tables, p)),
               (csv_path, lambda p: write_csv(tables, p, not single)),
               (latex_path, lambda p: write_text(latex_table(only, metrics, digits) if single
                                                 else comparison_latex(tables, metrics, digits), p)),
               (per_image_path, lambda p: write_per_image_csv(images, p, not single)),
               (plot_dir, lambda p: save_plots(curves, tables, p))]
    failed = []
    for path, write in writers:
        if path is None:
            continue
        try:
            write(Path(path))
        except OSError as e:
            failed.append(f"cannot write {path} ({os_reason(e)}); the table above is complete, rerun with a "
                          "writable path for this output")
    return failed

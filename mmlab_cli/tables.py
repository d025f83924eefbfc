"""Tables as text, shared by the analyses and the report: Markdown through pandas' `to_markdown`
(tabulate), LaTeX through `Styler.to_latex` (booktabs rules, right-aligned numbers, math in headers),
and the rounding of a mean to the digits its standard deviation supports."""

from __future__ import annotations

import math
import re

import pandas as pd

# unicode in labels and cells -> LaTeX; every other character of a cell is escaped for text mode
LATEX_TOKENS = {"λ_max": r"$\lambda_{\max}$", "λ1/λ5": r"$\lambda_1/\lambda_5$", "L_LPF": r"$L_{\mathrm{LPF}}$",
                "Δ_LPF": r"$\Delta_{\mathrm{LPF}}$", "F_gap": r"$F_{\mathrm{gap}}$", "W2²": r"$W_2^2$",
                "Tr Σ": r"$\mathrm{Tr}\,\Sigma$", "‖φ‖": r"$\|\phi\|$", "Δ_error": r"$\Delta_{\mathrm{error}}$",
                "ε_rel": r"$\epsilon_{\mathrm{rel}}$", "±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
                "†": r"\dag{}", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                "|": r"$|$", "<": r"$<$", ">": r"$>$", "%": r"\%", "&": r"\&", "_": r"\_", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
_TOKEN = re.compile("|".join(map(re.escape, sorted(LATEX_TOKENS, key=len, reverse=True))))


def to_markdown(df: pd.DataFrame, numeric=()) -> str:
    """A GitHub Markdown table (no index), `numeric` columns right-aligned; '|' inside a cell or header is
    escaped so it cannot split a column."""
    def esc(v) -> str:
        return str(v).replace("|", "\\|")

    align = ["right" if c in numeric else "left" for c in df.columns]
    return df.rename(columns=esc).map(esc).to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def latex_text(value) -> str:
    """A cell or header for LaTeX text mode: known symbols as math, special characters escaped."""
    return _TOKEN.sub(lambda m: LATEX_TOKENS[m.group()], str(value))


def to_latex(df: pd.DataFrame, caption: str, label: str, numeric: list[str], bold=None) -> str:
    """A booktabs table (`\\usepackage{booktabs}`) with caption and label; `numeric` columns right-aligned,
    the others left; `bold` (a boolean frame like df) marks cells set in bold."""
    styler = df.style.hide(axis="index").format(latex_text).format_index(latex_text, axis=1)
    if bold is not None:
        styler = styler.apply(lambda _: bold.replace({True: "textbf:--rwrap;", False: ""}), axis=None)
    align = "".join("r" if c in numeric else "l" for c in df.columns)
    return styler.to_latex(caption=latex_text(caption), label=label, hrules=True, column_format=align,
                           position="t", position_float="centering")


def decimals(std: float, digits: int = 2) -> int | None:
    """Decimal places that keep `digits` significant digits of a spread (None: no spread to go by)."""
    if not math.isfinite(std) or std <= 0:
        return None
    return max(0, digits - 1 - math.floor(math.log10(std)))


def mean_std(mean: float, std: float, fmt: str) -> str:
    """'mean ± std' rounded to the std's two significant digits; `fmt` when there is no spread (one seed)."""
    places = decimals(std)
    if places is None:
        return f"{mean:{fmt}}" if math.isnan(std) else f"{mean:{fmt}} ± {std:{fmt}}"
    return f"{mean:.{places}f} ± {std:.{places}f}"

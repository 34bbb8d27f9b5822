"""Figure 2 of the paper and a trajectory view: tidy tables in, matplotlib Figure out.

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so
nothing here touches the global backend or pyplot's figure list: the caller decides
whether to save (``fig.savefig``) or show (a notebook renders a Figure directly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from wda.report.fit import fit_groups, ordered_runs
from wda.steps import step_text

# Filled markers only, so that each point carries its layer colour; they repeat past 12.
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
REGRESSION_GID = "regression"
MINUS = "\u2212"

# Paper size: ~7.5 in wide for three panels; nothing below 8 pt, legible in a notebook.
_STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
    "legend.title_fontsize": 8, "axes.linewidth": 0.6,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6,
}
_PANEL_W, _PANEL_H, _MAX_COLS = 2.45, 2.15, 3
# What the y axis shows: metrics column -> label.
Y_LABELS = {"delta_m": "ΔM (magnitude)", "delta_m_rel": "ΔM / mean ‖m₀‖ (relative)"}
# The default matrix kind: a query projection if there is one (the paper's Figure 2).
_QUERY_FIRST = ("q_proj", "query", "q", "q_lin", "wq", "query_proj", "c_attn")


def default_matrix(metrics: pd.DataFrame) -> str:
    """The matrix kind drawn when none is named: a query kind if present, else the first."""
    kinds = sorted(metrics["matrix"].astype(str).unique())
    if not kinds:
        raise ValueError("the metrics table is empty")
    return next((k for k in _QUERY_FIRST if k in kinds), kinds[0])


def _select(metrics: pd.DataFrame, matrix: str | None, runs: Sequence[str] | None, y: str
            ) -> tuple[pd.DataFrame, list[str], str]:
    if y not in Y_LABELS:
        raise ValueError(f"y must be one of {list(Y_LABELS)}, not {y!r}")
    if y not in metrics.columns:
        raise ValueError(f"the metrics table has no {y!r} column")
    matrix = default_matrix(metrics) if matrix is None else matrix
    kinds = sorted(metrics["matrix"].astype(str).unique())
    if matrix not in kinds:
        raise ValueError(f"matrix kind {matrix!r} not in the metrics table (has {kinds})")
    sub = metrics[metrics["matrix"] == matrix]
    if "axis" in sub.columns and sub["axis"].nunique() > 1:
        raise ValueError(f"the table holds both axes ({sorted(sub['axis'].unique())}); "
                         "select one, e.g. metrics[metrics.axis == 'out']")
    present = ordered_runs(sub)
    if runs is None:
        return sub, present, matrix
    runs = [runs] if isinstance(runs, str) else list(runs)
    unknown = [r for r in runs if r not in present]
    if unknown:
        raise ValueError(f"run(s) {unknown} not in the metrics table for {matrix!r} (has {present})")
    return sub, runs, matrix


def _axis_text(sub: pd.DataFrame) -> str:
    if "axis" not in sub.columns or sub.empty:
        return ""
    return f" (axis {sub['axis'].iloc[0]})"


def _target_axes(n: int, ax, fig: Figure | None, extra_h: float, rows: int = 1
                 ) -> tuple[Figure, list[Axes], bool]:
    """Axes to draw n panels (× rows) into: the caller's (``ax``: one Axes or a sequence, or
    ``fig``: a Figure to fill), else a new figure. The bool says whether the figure is ours."""
    if ax is not None:
        axes = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != n * rows:
            raise ValueError(f"ax= needs {n * rows} Axes (one per panel), got {len(axes)}")
        return axes[0].figure, axes, False
    if fig is not None:
        ncols = n if rows > 1 else min(max(n, 1), _MAX_COLS)
        nrows = rows if rows > 1 else math.ceil(max(n, 1) / ncols)
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = grid.ravel().tolist()
        for extra in axes[n * rows:]:
            fig.delaxes(extra)
        return fig, axes[: n * rows], False
    if rows > 1:
        new = Figure(figsize=(_PANEL_W * max(n, 1) + 0.6, 4.2), layout="constrained")
        return new, new.subplots(rows, max(n, 1), squeeze=False).ravel().tolist(), True
    new, axes = _grid(n, extra_h)
    return new, axes, True


def _layer_colors(layers: Sequence) -> tuple[ListedColormap, BoundaryNorm, dict]:
    """A discrete colormap with one colour per layer (ordered, so depth reads as hue)."""
    layers = sorted(set(layers))
    # viridis without its pale-yellow end, which vanishes on white.
    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(layers))))
    norm = BoundaryNorm(np.arange(len(layers) + 1) - 0.5, len(layers))
    return cmap, norm, {layer: i for i, layer in enumerate(layers)}


def _layer_colorbar(fig: Figure, axes: list[Axes], cmap, norm, index: dict) -> None:
    layers = list(index)
    step = max(1, math.ceil(len(layers) / 12))  # at most ~12 tick labels
    ticks = list(range(0, len(layers), step))
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, ticks=ticks,
                        fraction=0.04, pad=0.02, aspect=30)
    cbar.ax.set_yticklabels([str(layers[i]) for i in ticks])
    cbar.set_label("layer")
    cbar.ax.tick_params(length=0)


def _sci_axes(ax: Axes, axis: str = "both") -> None:
    # ΔD is often 1e-6 ... 1e-3: scientific notation with a shared ×10^k offset.
    ax.ticklabel_format(style="sci", axis=axis, scilimits=(-2, 3), useMathText=True)


def _fmt(v: float, spec: str) -> str:
    return format(v, spec).replace("-", MINUS)


def _panel_title(run: str, method: str, fit: pd.Series | None) -> str:
    name = f"{run} ({method})"  # every panel alike, whatever the run is called
    if fit is None:
        return f"{name}\nr undefined (no fit)"
    if not np.isfinite(fit["pearson_r"]):
        return f"{name}\nr undefined ({fit.get('note') or 'no fit'}, n = {int(fit['n'])})"
    return (f"{name}\nr = {_fmt(fit['pearson_r'], '.2f')}  "
            f"(slope {_fmt(fit['slope'], '.1e')}, n = {int(fit['n'])})")


def _lookup_fit(fits: pd.DataFrame, run: str, matrix: str, axis: str | None = None) -> pd.Series | None:
    hit = fits[(fits["run"] == run) & (fits["matrix"] == matrix)]
    if axis is not None and "axis" in hit.columns:
        hit = hit[hit["axis"] == axis]
    return None if hit.empty else hit.iloc[0]


def _scatter_panel(ax: Axes, data: pd.DataFrame, step_marker: dict, cmap, norm,
                   layer_index: dict, y: str = "delta_m") -> None:
    for step, pts in data.groupby("step", sort=True):
        ax.scatter(pts["delta_d"], pts[y], c=pts["layer"].map(layer_index),
                   cmap=cmap, norm=norm, marker=step_marker[step], s=16,
                   edgecolors="0.15", linewidths=0.3, zorder=2)


def _regression_line(ax: Axes, data: pd.DataFrame, fit: pd.Series | None) -> None:
    if fit is None or not np.isfinite(fit["slope"]):
        return  # undefined fit: no line rather than a misleading flat one
    x = data["delta_d"].to_numpy(dtype=np.float64)
    x = x[np.isfinite(x)]
    xs = np.array([x.min(), x.max()])
    (line,) = ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="crimson",
                      lw=1.0, zorder=3)
    line.set_gid(REGRESSION_GID)


def _step_legend(fig: Figure, steps: list, ax: Axes | None = None) -> None:
    handles = [Line2D([], [], linestyle="", marker=MARKERS[i % len(MARKERS)], markersize=4,
                      color="0.45", markeredgecolor="0.15", markeredgewidth=0.3)
               for i in range(len(steps))]
    labels = [step_text(s) for s in steps]
    title = "step" if len(steps) <= len(MARKERS) else f"step (markers repeat every {len(MARKERS)})"
    ncols = min(len(steps), 12)
    nrows = math.ceil(len(steps) / ncols)
    # The legend fills column by column; permute so that steps read left to right.
    order = [r * ncols + c for c in range(ncols) for r in range(nrows) if r * ncols + c < len(steps)]
    if ax is not None:  # the caller's axes: a legend inside the last one, no layout assumed
        ax.legend([handles[i] for i in order], [labels[i] for i in order], title=title,
                  ncols=min(ncols, 4), frameon=False, handletextpad=0.1, columnspacing=0.9)
        return
    fig.legend([handles[i] for i in order], [labels[i] for i in order],
               loc="outside lower center", title=title, ncols=ncols, frameon=False,
               handletextpad=0.1, columnspacing=0.9)


def _grid(n_panels: int, extra_h: float) -> tuple[Figure, list[Axes]]:
    ncols = min(max(n_panels, 1), _MAX_COLS)
    nrows = math.ceil(max(n_panels, 1) / ncols)
    fig = Figure(figsize=(_PANEL_W * ncols + 0.6, _PANEL_H * nrows + extra_h),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def figure2(metrics: pd.DataFrame, fits: pd.DataFrame | None = None, matrix: str | None = None,
            runs: Sequence[str] | None = None, ax=None, fig: Figure | None = None,
            y: str = "delta_m") -> Figure:
    """The paper's Figure 2 for one matrix kind: one panel per run, x = ΔD, y = ΔM.

    Colour = layer, marker = training step, line = least-squares fit from ``fits``
    (``fit_groups`` output; computed here without resampling if None, or when ``y`` is not
    ``delta_m``). ``matrix``: default a query kind if present, else the first kind. Runs
    default to FT, LoRA, DoRA, then others; ``runs`` picks and orders them (unknown names
    are an error). ``ax``: an Axes (one run) or one Axes per run to draw into; ``fig``: a
    Figure to fill; default a new Figure. ``y="delta_m_rel"``: ΔM / mean ‖m₀‖.
    """
    sub, order, matrix = _select(metrics, matrix, runs, y)
    if fits is None or y != "delta_m":
        fits = fit_groups(sub.assign(delta_m=sub[y]), n_boot=0, n_perm=0)
    axis = str(sub["axis"].iloc[0]) if "axis" in sub.columns and len(sub) else None
    steps = sorted(sub["step"].unique())
    step_marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(steps)}
    with matplotlib.rc_context(_STYLE):
        fig, axes, ours = _target_axes(len(order), ax, fig, extra_h=0.8)
        cmap, norm, layer_index = _layer_colors(sub["layer"].tolist())
        for a, run in zip(axes, order):
            data = sub[sub["run"] == run]
            method = data["method"].iloc[0]
            fit = _lookup_fit(fits, run, matrix, axis)
            _scatter_panel(a, data, step_marker, cmap, norm, layer_index, y)
            _regression_line(a, data, fit)
            a.set_title(_panel_title(run, method, fit))
            a.set_xlabel("ΔD (direction, 1 − cos)")
            a.set_ylabel(Y_LABELS[y])
            _sci_axes(a)
        _layer_colorbar(fig, axes, cmap, norm, layer_index)
        _step_legend(fig, steps, None if ours else axes[-1])
        title = f"{matrix}: magnitude vs direction change{_axis_text(sub)}"
        if ours:
            fig.suptitle(title, fontsize=9)
        elif len(axes) == 1:
            axes[0].set_title(f"{title}\n{axes[0].get_title()}")
    return fig


_X_LABELS = {"step": "step", "train_loss": "training loss", "epoch": "epoch", "learning_rate": "learning rate"}


def trajectories(metrics: pd.DataFrame, matrix: str | None = None,
                 runs: Sequence[str] | None = None, ax=None, fig: Figure | None = None,
                 y: str = "delta_m", x: str = "step") -> Figure:
    """ΔM (top row) and ΔD (bottom row) against ``x``, one line per layer, one column per run.

    ``x``: the step, or a column logged by the Trainer such as ``train_loss`` (runs with
    nothing logged in it are left out). ``matrix``, ``runs``, ``fig``, ``y`` as in
    ``figure2``; ``ax``: 2 × (number of runs) Axes (rows ΔM, ΔD), e.g. from
    ``fig.subplots(2, n)``.
    """
    sub, order, matrix = _select(metrics, matrix, runs, y)
    if x != "step":
        sub = sub[sub[x].notna()]
        order = [r for r in order if r in set(sub["run"])]
    with matplotlib.rc_context(_STYLE):
        ncols = max(len(order), 1)
        fig, flat, ours = _target_axes(ncols, ax, fig, extra_h=0.0, rows=2)
        grid = np.asarray(flat, dtype=object).reshape(2, ncols)
        cmap, norm, layer_index = _layer_colors(sub["layer"].tolist())
        for col, run in enumerate(order):
            data = sub[sub["run"] == run]
            method = data["method"].iloc[0]
            grid[0, col].set_title(_panel_title(run, method, None).split("\n")[0])
            for row, (column, label) in enumerate(((y, Y_LABELS[y].split(" (")[0]), ("delta_d", "ΔD"))):
                a = grid[row, col]
                for layer, pts in data.groupby("layer", sort=True):
                    pts = pts.sort_values("step")  # in training order, whatever x is
                    # Markers too, so that a single step still shows as points.
                    a.plot(pts[x], pts[column], marker="o", markersize=2, lw=0.9,
                           color=cmap(norm(layer_index[layer])))
                a.set_ylabel(label)
                _sci_axes(a, axis="y")  # steps read best as plain integers
            grid[1, col].set_xlabel(_X_LABELS.get(x, x))
        _layer_colorbar(fig, list(flat), cmap, norm, layer_index)
        if ours:
            what = "training step" if x == "step" else _X_LABELS.get(x, x) + " logged nearest each checkpoint"
            fig.suptitle(f"{matrix}: change against {what}{_axis_text(sub)}", fontsize=9)
    return fig


_DRIVER_COLORS = {"size": "#4C72B0", "alignment": "#DD8452", "base_norm": "#55A868",
                  "radial": "#8172B3", "tangential": "#937860"}
_DRIVER_LABELS = {"size": "update size", "alignment": "alignment", "base_norm": "base norm",
                  "radial": "radial ΔM", "tangential": "tangential ΔM"}


def drivers_figure(drivers: pd.DataFrame, matrix: str) -> Figure:
    """What drives r, per run of one matrix kind (``wda.report.attribution.drivers`` output): left,
    r split into update size, alignment and base norm; right, into ΔM's radial and tangential
    parts. Bars of one run add up to its r (the black dot)."""
    sub = drivers[drivers["matrix"] == matrix]
    runs = list(dict.fromkeys(sub["run"]))
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(6.2, 0.5 + 0.32 * max(len(runs), 1) + 0.9), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        y = np.arange(len(runs))[::-1]
        for ax, parts, title in ((axes[0], ("size", "alignment", "base_norm"), "r = size + alignment + base norm"),
                                 (axes[1], ("radial", "tangential"), "r = radial + tangential")):
            for i, run in enumerate(runs):
                f = sub[sub["run"] == run].iloc[0]
                pos = neg = 0.0
                for part in parts:
                    v = float(f[f"r_{part}"])
                    if not math.isfinite(v):
                        continue
                    left = pos if v >= 0 else neg
                    ax.barh(y[i], v, left=left, height=0.6, color=_DRIVER_COLORS[part],
                            label=_DRIVER_LABELS[part] if i == 0 else None)
                    pos, neg = (pos + v, neg) if v >= 0 else (pos, neg + v)
                if math.isfinite(float(f["pearson_r"])):
                    ax.plot(float(f["pearson_r"]), y[i], "o", color="black", markersize=3.5,
                            label="r" if i == 0 else None)
            ax.axvline(0.0, color="0.5", lw=0.6)
            ax.set_title(title)
            ax.set_xlabel("part of Pearson r(ΔD, ΔM)")
            ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=4, frameon=False,
                      handlelength=1.0, columnspacing=0.8)
        axes[0].set_yticks(y, [f"{r} ({m})" for r, m in zip(runs, sub["method"])])
        fig.suptitle(f"{matrix}: what drives the correlation", fontsize=8)
    return fig

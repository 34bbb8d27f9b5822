"""wda.report.plot: Figure 2 panels and the trajectory view, built without pyplot state."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from wda.report.fit import fit_groups
from wda.report.plot import MARKERS, REGRESSION_GID, figure2, trajectories

RUNS = [("dora", "DoRA"), ("mine", "custom"), ("ft", "FT"), ("lora", "LoRA")]


def metrics(runs=RUNS, layers=4, steps=(10, 20, 30), matrices=("q_proj", "v_proj"), seed=0):
    rng = np.random.default_rng(seed)
    rows = [dict(run=r, method=m, step=s, layer=l, matrix=k,
                 module=f"model.layers.{l}.self_attn.{k}",
                 delta_d=rng.uniform(1e-6, 1e-4), delta_m=rng.uniform(1e-3, 1e-2))
            for r, m in runs for s in steps for l in range(layers) for k in matrices]
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def no_pyplot_leak():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def panel_titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]


def data_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def points(ax) -> np.ndarray:
    colls = [c for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate([c.get_offsets() for c in colls]) if colls else np.empty((0, 2))


def regression_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if ln.get_gid() == REGRESSION_GID]


def test_one_panel_per_run_in_method_order_with_all_points():
    df = metrics()
    fig = figure2(df, fit_groups(df, n_boot=0), matrix="q_proj")
    assert isinstance(fig, Figure)
    axes = data_axes(fig)
    assert [t.split("\n")[0] for t in panel_titles(fig)] == ["ft (FT)", "lora (LoRA)", "dora (DoRA)", "mine (custom)"]
    q = df[df["matrix"] == "q_proj"]
    assert sum(len(points(ax)) for ax in axes) == len(q)
    # each panel holds exactly its run's (ΔD, ΔM) points
    ft = q[q["run"] == "ft"][["delta_d", "delta_m"]].to_numpy()
    np.testing.assert_allclose(np.sort(points(axes[0]), axis=0), np.sort(ft, axis=0))


def test_one_marker_per_step_and_one_colour_per_layer():
    df = metrics(runs=[("ft", "FT")], layers=5, steps=(1, 2, 3), matrices=("q_proj",))
    df = df.assign(layer=df["layer"] * 3 + 2).sample(frac=1.0, random_state=0)  # 2, 5, ...
    ax = data_axes(figure2(df, matrix="q_proj"))[0]
    colls = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(colls) == 3  # one scatter (one marker) per step
    assert len({c.get_paths()[0].vertices.tobytes() for c in colls}) == 3  # markers differ
    layer_of = {(d, m): l for d, m, l in zip(df["delta_d"], df["delta_m"], df["layer"])}
    colour_of: dict[int, set] = {}
    for c in colls:
        rgba = c.cmap(c.norm(c.get_array()))
        for (d, m), colour in zip(c.get_offsets(), rgba):
            colour_of.setdefault(layer_of[(d, m)], set()).add(tuple(colour))
    assert all(len(cs) == 1 for cs in colour_of.values())  # a layer keeps its colour
    assert len(set().union(*colour_of.values())) == 5  # and layers differ


def test_regression_line_lies_on_fit_and_title_shows_r():
    df = metrics()
    fits = fit_groups(df, n_boot=0)
    fig = figure2(df, fits, matrix="v_proj")
    for ax in data_axes(fig):
        name = ax.get_title().split("\n")[0].split(" ")[0]
        run = {"FT": "ft", "LoRA": "lora", "DoRA": "dora"}.get(name, name)
        fit = fits[(fits["run"] == run) & (fits["matrix"] == "v_proj")].iloc[0]
        (line,) = regression_lines(ax)
        x, y = line.get_data()
        np.testing.assert_allclose(y, fit["slope"] * np.asarray(x) + fit["intercept"], rtol=1e-12)
        xd = df[(df["run"] == run) & (df["matrix"] == "v_proj")]["delta_d"]
        assert (min(x), max(x)) == (xd.min(), xd.max())
        title = ax.get_title().replace("\u2212", "-")
        assert f"r = {fit['pearson_r']:.2f}" in title and f"n = {fit['n']}" in title


def test_undefined_fit_draws_no_line_and_says_so():
    df = metrics(runs=[("ft", "FT"), ("lora", "LoRA")], layers=1, steps=(5,))  # one point each
    fig = figure2(df, fit_groups(df), matrix="q_proj")
    for ax in data_axes(fig):
        assert regression_lines(ax) == []
        assert "r undefined (n < 3" in ax.get_title()
        assert len(points(ax)) == 1


def test_single_step_and_single_layer_still_plot():
    for layers, steps in ((1, (1, 2, 3, 4)), (6, (7,))):
        df = metrics(runs=[("a", "DoRA")], layers=layers, steps=steps, matrices=("query",))
        ax = data_axes(figure2(df, matrix="query"))[0]
        assert len(points(ax)) == layers * len(steps)
        assert len(regression_lines(ax)) == 1


def test_runs_argument_picks_and_orders_panels_and_bad_matrix_is_clear():
    df = metrics()
    fig = figure2(df, matrix="q_proj", runs=["mine", "ft"])
    assert [t.split("\n")[0] for t in panel_titles(fig)] == ["mine (custom)", "ft (FT)"]
    with pytest.raises(ValueError, match="c_attn"):
        figure2(df, matrix="c_attn")


def test_many_steps_reuse_markers():
    df = metrics(runs=[("ft", "FT")], layers=2, steps=tuple(range(len(MARKERS) + 3)))
    ax = data_axes(figure2(df, matrix="q_proj"))[0]
    assert len(points(ax)) == len(df[df["matrix"] == "q_proj"])


def test_fonts_are_legible_and_size_is_paper_like():
    fig = figure2(metrics(runs=RUNS[:3]), matrix="q_proj")
    w, h = fig.get_size_inches()
    assert 6 <= w <= 8 and 2 <= h <= 3.5
    fig.draw_without_rendering()  # tick labels and offset texts exist only after a draw
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert len(texts) > 20 and min(t.get_fontsize() for t in texts) >= 8


def test_trajectories_one_column_per_run_one_line_per_layer():
    df = metrics(layers=3)
    fig = trajectories(df, "q_proj")
    axes = data_axes(fig)
    assert len(axes) == 2 * 4  # (ΔM, ΔD) rows x 4 runs
    for ax in axes:
        assert len(ax.get_lines()) == 3
    assert [ax.get_title() for ax in axes[:4]] == ["ft (FT)", "lora (LoRA)", "dora (DoRA)", "mine (custom)"]


@pytest.mark.parametrize("ext", ["png", "svg", "pdf"])
def test_saves_in_raster_and_vector_formats(tmp_path, ext):
    df = metrics(runs=RUNS[:3], layers=3, steps=(1, 2))
    for name, fig in (("fig2", figure2(df, matrix="q_proj")), ("traj", trajectories(df, "q_proj"))):
        path = tmp_path / f"{name}.{ext}"
        fig.savefig(path, dpi=50)
        assert path.stat().st_size > 1000


def test_trajectories_against_the_training_loss_leave_out_runs_without_it():
    df = metrics(layers=2, steps=(10, 20, 30))
    loss = {10: 3.0, 20: 2.5, 30: 2.25}
    df["train_loss"] = [loss[s] if r in ("ft", "lora") else np.nan for r, s in zip(df["run"], df["step"])]
    fig = trajectories(df, "q_proj", x="train_loss")
    axes = data_axes(fig)
    assert len(axes) == 2 * 2 and [ax.get_title() for ax in axes[:2]] == ["ft (FT)", "lora (LoRA)"]
    for ax in axes:
        for line in ax.get_lines():  # in training order: the loss falls along the line
            assert list(line.get_xdata()) == [3.0, 2.5, 2.25]
    assert axes[-1].get_xlabel() == "training loss"
    layer0 = df[(df["run"] == "ft") & (df["matrix"] == "q_proj") & (df["layer"] == 0)].sort_values("step")
    assert list(axes[0].get_lines()[0].get_ydata()) == list(layer0["delta_m"])
    assert list(axes[2].get_lines()[0].get_ydata()) == list(layer0["delta_d"])


def test_draws_into_the_callers_axes_or_figure():
    df = metrics(runs=[("ft", "FT"), ("lora", "LoRA")])
    user = Figure(figsize=(4, 3))
    ax = user.subplots()
    got = figure2(df[df["run"] == "ft"], matrix="q_proj", ax=ax)
    assert got is user and len(points(ax)) == 4 * 3 and len(regression_lines(ax)) == 1
    two = Figure()
    axes = two.subplots(1, 2)
    figure2(df, matrix="q_proj", ax=axes)
    assert [len(points(a)) for a in axes] == [12, 12]
    with pytest.raises(ValueError, match="needs 2 Axes"):
        figure2(df, matrix="q_proj", ax=ax)
    filled = Figure()
    assert figure2(df, matrix="q_proj", fig=filled) is filled and len(data_axes(filled)) == 2
    traj = Figure()
    grid = traj.subplots(2, 2)
    assert trajectories(df, "q_proj", ax=grid) is traj
    assert all(len(a.get_lines()) == 4 for a in grid.ravel())


def test_default_matrix_is_a_kind_present_and_unknown_runs_are_rejected():
    gpt2 = metrics(runs=[("ft", "FT")], matrices=("c_attn", "c_proj"))
    fig = figure2(gpt2)  # no q_proj in a GPT-2 table
    assert "c_attn" in fig.get_suptitle()
    assert "q_proj" in figure2(metrics()).get_suptitle()
    assert "c_attn" in trajectories(gpt2).get_suptitle()
    with pytest.raises(ValueError, match="nope"):
        figure2(metrics(), runs=["ft", "nope"])
    with pytest.raises(ValueError, match="nope"):
        trajectories(metrics(), runs=["nope"])


def test_axis_in_title_and_relative_magnitude_option():
    df = metrics(runs=RUNS[:1]).assign(axis="in", m0_mean=2.0)
    df["delta_m_rel"] = df["delta_m"] / df["m0_mean"]
    fig = figure2(df, matrix="q_proj", y="delta_m_rel")
    assert "(axis in)" in fig.get_suptitle()
    ax = data_axes(fig)[0]
    assert "relative" in ax.get_ylabel()
    q = df[df["matrix"] == "q_proj"]
    np.testing.assert_allclose(np.sort(points(ax)[:, 1]), np.sort(q["delta_m"] / 2.0))
    # the line is the fit of what is drawn: slope halves with y
    (line,) = regression_lines(ax)
    xs, ys = line.get_data()
    slope = np.polyfit(q["delta_d"], q["delta_m"] / 2.0, 1)[0]
    assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(slope, rel=1e-9)
    both = pd.concat([df, df.assign(axis="out")])
    with pytest.raises(ValueError, match="both axes"):
        figure2(both, matrix="q_proj")

"""The text of report.md, built from the tables and the manifest (returns a string).

Manifest keys read (all optional; missing ones are shown as "not recorded"):
``ckpt_dir``, ``axis`` (and ``axis_meaning`` for an axis other than out/in), ``dtype``,
``device``, ``command`` (str or argv list), ``versions`` (name -> version), ``skipped``
(list of str, or of dicts with ``path`` and ``reason``), ``notes`` (list of str),
``created`` (timestamp string). Timings are left to manifest.json so that the same
inputs give the same report.md.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd

from wda.report.fit import METHOD_ORDER, MIN_LAYERS_PER_STEP, ordered_runs
from wda.steps import step_text

# Paper, Sec. 4.1 (discussing Fig. 2): correlation between ΔD and ΔM of the query
# matrices of VL-BART. No numbers are given for the value matrices (Fig. 6).
PAPER_R: dict[str, float] = {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}
PAPER_CITATION = ("Liu et al., DoRA, ICML 2024 (arXiv 2402.09353), Sec. 4.1 and Fig. 2, "
                  "query matrices of VL-BART")
# Matrix kinds that are a query projection in common architectures (BART/Llama q_proj,
# BERT/ViT query, T5 q, DistilBERT q_lin). GPT-2 c_attn is a fused q/k/v: not comparable.
QUERY_KINDS = frozenset({"q_proj", "query", "q", "q_lin", "wq", "query_proj"})
AXIS_TEXT = {
    "out": "`out`: one magnitude per output feature (norm over dim=1 of the (out, in) "
           "weight, as in PEFT and the DoRA reference code)",
    "in": "`in`: one magnitude per input feature (norm over dim=0 of the (out, in) weight)",
}
NA = "—"
COLUMNS_TEXT = (
    "Columns of `metrics.csv`: `delta_d` is 1 − cos between a vector and its base vector, "
    "averaged over the vectors of the matrix (dimensionless, 0 = same direction, 2 = opposite; "
    "not an angle: 1 − cos θ ≈ θ²/2 for small θ); `delta_m` is the mean |‖v‖ − ‖v_0‖| in "
    "the units of the weights; `m0_mean` the mean base norm ‖v_0‖ and `delta_m_rel` = "
    "`delta_m` / `m0_mean` (dimensionless, comparable across layers and methods); `stack` "
    "is the module name before the layer index (`model.layers`, `encoder.layer`), so that "
    "an encoder's and a decoder's layer 3 stay apart; `n_vectors` / `n_excluded` count the "
    "vectors and the zero-norm ones left out; `axis` says which vectors (rows or columns).")


# ---------------------------------------------------------------- formatting helpers
def _isnum(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v))


def fmt(v: object, spec: str = ".3g") -> str:
    """A number in ``spec``, or an em dash for NaN / missing."""
    return format(float(v), spec) if _isnum(v) else NA


def fmt_r(r: object, note: object = "") -> str:
    """A correlation with its sign (+0.83), or "undefined (reason)" -- never "nan"."""
    if _isnum(r):
        return format(float(r), "+.2f")
    if note == "unchanged from base":  # nothing moved: not a failed fit
        return note
    return f"undefined ({note})" if isinstance(note, str) and note else "undefined"



def _cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]],
          right: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; ``right[i]`` right-aligns column i (numbers)."""
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _steps_text(steps: Sequence[int]) -> str:
    steps = sorted(int(s) for s in steps)
    if len(steps) <= 8:
        return ", ".join(map(step_text, steps))
    return f"{steps[0]}, {steps[1]}, {steps[2]}, …, {steps[-1]} ({len(steps)} steps)"


def _method_of(metrics: pd.DataFrame) -> dict[str, str]:
    return dict(zip(metrics["run"].astype(str), metrics["method"].astype(str)))


# ---------------------------------------------------------------- sections
def _inputs_section(metrics: pd.DataFrame, manifest: Mapping) -> str:
    axis = manifest.get("axis")
    if axis is None and "axis" in metrics and len(metrics):
        axis = metrics["axis"].iloc[0]
    axis_text = AXIS_TEXT.get(axis, f"`{axis}`: {manifest.get('axis_meaning', '')}"
                              if axis else "not recorded")
    layers = sorted(metrics["layer"].unique()) if len(metrics) else []
    kinds = metrics.groupby("matrix")["module"].nunique() if len(metrics) else {}
    out = ["## What was analysed", "",
           f"- Checkpoint directory: `{manifest.get('ckpt_dir', 'not recorded')}`",
           f"- Magnitude axis: {axis_text}",
           f"- Compute dtype: `{manifest.get('dtype', 'not recorded')}`; "
           f"device: `{manifest.get('device', 'not recorded')}`",
           "- Matrix kinds: "
           + (", ".join(f"`{k}` ({n} modules)" for k, n in kinds.items()) or NA),
           f"- Layers: {len(layers)}" + (f" ({layers[0]}–{layers[-1]})" if layers else ""),
           f"- Points (run, step, module): {len(metrics)}"]
    if manifest.get("created"):
        out.append(f"- Created: {manifest['created']}")
    out += [f"- Note: {note}" for note in manifest.get("notes") or []]
    out += ["", "Each point is ΔM (paper Eq. 3, mean |m_t − m_0| over vectors) and ΔD "
            "(Eq. 4, mean 1 − cos(W_t, W_0)) of one module at one checkpoint, against the "
            "base weights.", "", COLUMNS_TEXT, ""]
    out += ["### Runs", "", *_runs_lines(metrics, manifest.get("runs")), ""]
    return "\n".join(out + _excluded_lines(metrics) + _skipped_lines(manifest.get("skipped")))


def _layers_text(layers: Sequence[int]) -> str:
    layers = sorted(int(x) for x in layers)
    if not layers:
        return NA
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers))


def _setting(d: Mapping, key: str, spec: str | None = None) -> str:
    v = d.get(key) if isinstance(d, Mapping) else None
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        names = [str(x) for x in v]
        if any("." in n for n in names):  # full module names: their kinds, and how many
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            return ", ".join(f"`{k}`" for k in kinds) + f" ({len(names)} modules)"
        return ", ".join(f"`{x}`" for x in names) or NA
    return format(v, spec) if spec and _isnum(v) else str(v)


def run_order(metrics: pd.DataFrame, runs: object = None) -> list[str]:
    """The one run order of every table: FT, LoRA, DoRA, others, then by name -- over the
    runs of the manifest (also those without a row) or of the table."""
    if isinstance(runs, list) and runs and all(isinstance(r, Mapping) for r in runs):
        frame = pd.DataFrame({"run": [str(r.get("name")) for r in runs],
                              "method": [str(r.get("method")) for r in runs]})
        return ordered_runs(frame)
    return ordered_runs(metrics) if len(metrics) else []


def _runs_lines(metrics: pd.DataFrame, runs: object) -> list[str]:
    """The runs table: what each run is, what it covers, how it was trained (when known)."""
    if not (isinstance(runs, list) and runs and all(isinstance(r, Mapping) for r in runs)):
        method = _method_of(metrics)
        rows = [(r, method[r], _steps_text(metrics.loc[metrics["run"] == r, "step"].unique()))
                for r in run_order(metrics)]
        return [table(["run", "method", "steps"], rows)]
    by_name = {str(r.get("name")): r for r in runs}
    rows = []
    for name in run_order(metrics, runs):
        r = by_name[name]
        ad, tr = r.get("adapter") or {}, r.get("training") or {}
        n_mod = r.get("modules")
        covers = ("none of the selected modules" if n_mod == 0 else
                  f"{n_mod} ({', '.join(f'`{m}`' for m in r.get('matrices') or [])})"
                  if n_mod is not None else NA)
        lr = _setting(tr, "lr", ".3g") if "lr" in tr else (
            f"{_setting(tr, 'lr_peak_logged', '.3g')} (peak logged)" if "lr_peak_logged" in tr else NA)
        rows.append((name, r.get("method", NA), _steps_text(r.get("steps") or []), covers,
                     _layers_text(r.get("layers") or []), _setting(ad, "r"), _setting(ad, "lora_alpha"),
                     _setting(ad, "use_rslora"), _setting(ad, "target_modules"),
                     _setting(ad, "lora_dropout"), lr, _setting(tr, "steps")))
    return [table(["run", "method", "checkpoint steps", "modules covered", "layers", "r", "alpha",
                   "rsLoRA", "targets", "dropout", "lr", "training steps"], rows),
            "", "r, alpha, rsLoRA, targets and dropout are read from each run's last "
            "adapter_config.json (— for full weights); lr and training steps from "
            "trainer_state.json or CKPT_DIR/train_log.json, when present."]


def _excluded_lines(metrics: pd.DataFrame) -> list[str]:
    if "n_excluded" not in metrics or not (metrics["n_excluded"] > 0).any():
        return ["No zero-norm vectors were excluded.", ""]
    hit = metrics[metrics["n_excluded"] > 0]
    agg = hit.groupby(["run", "module"], sort=True).agg(
        steps=("step", "nunique"), excluded=("n_excluded", "max"),
        vectors=("n_vectors", "max") if "n_vectors" in hit else ("n_excluded", "size"))
    rank = {r: i for i, r in enumerate(run_order(metrics))}  # the runs table's order
    rows = [(run, f"`{mod}`", r.steps, r.excluded, r.vectors) for (run, mod), r in
            sorted(agg.iterrows(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][1]))]
    return ["### Excluded zero-norm vectors", "",
            "Vectors with zero norm have no direction; they were left out of ΔD and ΔM.", "",
            table(["run", "module", "steps affected", "max excluded", "vectors"], rows,
                  [False, False, True, True, True]), ""]


def _skipped_lines(skipped: object) -> list[str]:
    if not skipped:
        return []
    items = [f"- `{s.get('path', s)}`: {s.get('reason', '')}" if isinstance(s, Mapping)
             else f"- `{s}`" for s in skipped]
    return ["### Skipped checkpoints", "", *items, ""]


def _ci(low: object, high: object, spec: str = "+.2f") -> str:
    return f"[{fmt(low, spec)}, {fmt(high, spec)}]" if _isnum(low) else NA


def inference_text(fits: pd.DataFrame, one_step: bool = False) -> str:
    """What the CI and p of the fits tables are, in words, with the resample counts used.
    ``one_step``: every run has one checkpoint, so a point is a layer (no repeated measures)."""
    n_boot = int(fits["n_boot"].iloc[0]) if "n_boot" in fits and len(fits) else 0
    used = fits[fits["n_perm"] > 0] if "n_perm" in fits else fits.iloc[:0]
    exact = [int(u) == math.factorial(int(g)) for u, g in zip(used["n_perm"], used["n_layers"])]
    level = float(fits["ci_level"].iloc[0]) if "ci_level" in fits and len(fits) else 0.95
    boot = (f"a percentile bootstrap over layers ({n_boot} resamples, each drawing as many "
            "layers as there are, with replacement, with all their steps)" if n_boot > 0
            else "not computed (no CI: 0 bootstrap resamples)")
    if used.empty:
        perm = "not computed (0 permutations)"
    elif all(exact):
        perm = "an exact two-sided permutation p-value (all G! pairings of the G layers)"
    else:
        perm = (f"a two-sided permutation p-value ({int(used['n_perm'].max())} seeded random "
                "pairings of the layers, or all G! when fewer)")
    if one_step:
        p_text = (f"p is {perm}" if used.empty else
                  f"p is {perm} of the layers' ΔM values: with one step per layer, the ordinary "
                  "permutation test of r, and with G layers p ≥ 2/G! (0.083 for 4 layers)")
        return (f"Every run is one checkpoint (a single endpoint), so each point is one layer (one "
                f"module) and the fits are across layers only, with no course over training. The "
                f"{level:.0%} CIs of r and of the slope are {boot}: with one step per layer, the "
                f"ordinary bootstrap. {p_text}. The columns marked *naive* (t-test p, bootstrap "
                "over points) are shown for comparison.")
    return (f"Each layer is measured at several steps, so the points are repeated measures, not "
            f"independent: the layer (one module) is the resampling unit. The {level:.0%} CIs of r "
            f"and of the slope are {boot}. p is {perm} that permutes the layers' ΔM trajectories "
            "between layers, step aligned with step. Its null: which layer's ΔM trajectory goes "
            "with which layer's ΔD trajectory does not matter. Every permutation keeps each "
            "layer's own course over the steps, so a pooled r made only of the growth that all "
            "layers share over training is not significant, and with G layers p ≥ 2/G! (0.083 for "
            "4 layers). A CI that excludes 0 beside a large p says that r is reliably of its sign "
            "but through that shared growth, not through which layer changes more. The columns "
            "marked *naive* treat every point as independent (t-test p, "
            "bootstrap over points): shown for comparison only, they overstate the certainty.")


def _fits_section(fits: pd.DataFrame, metrics: pd.DataFrame | None = None) -> str:
    level = fits["ci_level"].iloc[0] if "ci_level" in fits and len(fits) else 0.95
    rows = [(f.run, f.method, f.matrix, f.n, f.n_layers, fmt_r(f.pearson_r, f.note),
             _ci(f.r_ci_low, f.r_ci_high), fmt(f.p_perm, ".2g"), fmt(f.spearman_rho, "+.2f"),
             fmt(f.slope), _ci(f.slope_ci_low, f.slope_ci_high, ".3g"), fmt(f.intercept),
             fmt(f.p_naive, ".2g"), _ci(f.r_ci_low_naive, f.r_ci_high_naive))
            for f in fits.itertuples()]
    return "\n".join([
        "## Fits: ΔM against ΔD, pooled over layers and steps", "",
        "`slope` and `intercept` are the least-squares line ΔM = slope · ΔD + intercept "
        "(units of ΔM per ΔD); `r` is the Pearson correlation and ρ Spearman's rank "
        "correlation. A slope is not a correlation.", "",
        inference_text(fits, one_step=_one_step(metrics)), "",
        table(["run", "method", "matrix", "points", "layers", "Pearson r",
               f"{level:.0%} CI of r (layers)", "p (layer permutation)", "Spearman ρ", "slope",
               f"{level:.0%} CI of slope (layers)", "intercept", "naive p", "naive CI of r"],
              rows, [False, False, False, *[True] * 11]), ""])


def _one_step(metrics: pd.DataFrame | None) -> bool:
    """Every run of the table has one checkpoint."""
    return (metrics is not None and len(metrics) > 0
            and int(metrics.groupby("run")["step"].nunique().max()) == 1)


def _paper_section(fits: pd.DataFrame) -> str:
    ref = ", ".join(f"{m} {PAPER_R[m]:+.2f}" for m in METHOD_ORDER)
    out = ["## Comparison with the paper", "",
           f"Reference: {PAPER_CITATION}. Correlation between ΔD and ΔM: {ref}. "
           "The paper does not name the coefficient and gives no numbers for the value "
           "matrices (Fig. 6); we compare its values with our pooled Pearson r, for query "
           "matrix kinds only.", ""]
    q = fits[fits["matrix"].astype(str).str.lower().isin(QUERY_KINDS)
             & fits["method"].isin(list(PAPER_R))]
    if q.empty:
        kinds = ", ".join(f"`{k}`" for k in sorted(QUERY_KINDS))
        return "\n".join(out + [f"No query matrix kind ({kinds}) with an FT, LoRA or DoRA "
                                "run in this analysis, so there is nothing to compare.", ""])
    rows = []
    for f in q.itertuples():
        paper = PAPER_R[f.method]
        agrees = ("undefined" if not _isnum(f.pearson_r)
                  else "yes" if np.sign(f.pearson_r) == np.sign(paper) else "no")
        rows.append((f.run, f.method, f.matrix, fmt_r(f.pearson_r, f.note), f"{paper:+.2f}",
                     agrees))
    return "\n".join(out + [table(["run", "method", "matrix", "our r", "paper r", "sign agrees"],
                                  rows, [False, False, False, True, True, False]), ""])


def _short_note(note: object) -> str:
    """A per-step cell's reason: "not reported (n = 4 < 5)" rather than the whole note."""
    note = note if isinstance(note, str) else ""
    return note.split(":")[0] if note.startswith("n = ") else note


def _per_step_cell(r: object, note: object) -> str:
    if not _isnum(r) and isinstance(note, str) and note.startswith("n = "):
        return f"not reported ({_short_note(note)})"
    return fmt_r(r, note)


def _per_step_section(fits: pd.DataFrame, per_step: pd.DataFrame | None) -> str:
    head = ["## Cross-layer correlation at each step", "",
            "Within one step, the points are the layers. This correlation can differ in "
            "sign from the pooled one (the layers move together over training), so both "
            f"are shown. It is reported only with at least {MIN_LAYERS_PER_STEP} layers: over n "
            "layers the exact permutation test of r has n! pairings, so even r = ±1 has a "
            f"two-sided p ≥ 2/n!, which is 0.083 for 4 layers and 0.017 for 5.", ""]
    if per_step is None or per_step.empty:
        return "\n".join(head + ["Not computed.", ""])
    summary, columns = [], {}
    for f in fits.itertuples():
        ps = per_step[(per_step["run"] == f.run) & (per_step["matrix"] == f.matrix)]
        r = ps["pearson_r"].to_numpy(dtype=float)
        ok = np.isfinite(r)
        same = (int((np.sign(r[ok]) == np.sign(f.pearson_r)).sum())
                if _isnum(f.pearson_r) and ok.any() else NA)
        median = fmt(np.median(r[ok]), "+.2f") if ok.any() else NA
        layers = sorted(set(ps["n"])) if "n" in ps and len(ps) else []
        n_text = "/".join(map(str, layers)) or NA
        summary.append((f.run, f.matrix, n_text, fmt_r(f.pearson_r, f.note), median, same,
                        int(ok.sum()), len(r)))
        columns[f"{f.run} · {f.matrix} (n = {n_text})"] = {
            s: _per_step_cell(v, n) for s, v, n in zip(ps["step"], ps["pearson_r"], ps["note"])}
    steps = sorted(set(per_step["step"]))
    pivot = [(step_text(s), *(col.get(s, NA) for col in columns.values())) for s in steps]
    head.append(table(["run", "matrix", "layers per step", "pooled r", "median per-step r",
                       "steps with pooled sign", "reported steps", "steps"], summary,
                      [False, False, True, True, True, True, True, True]))
    if not np.isfinite(per_step["pearson_r"].to_numpy(dtype=float)).any():
        return "\n".join(head + ["", f"No step has {MIN_LAYERS_PER_STEP} or more layers of one "
                                      "matrix kind: no per-step r is reported.", ""])
    return "\n".join(head + [
        "", "Pearson r across layers, per step (n = layers):", "",
        table(["step", *columns], pivot, [True] * (len(columns) + 1)), ""])


def _drivers_section(drivers: pd.DataFrame | None, per_step: pd.DataFrame | None) -> str:
    head = ["## What drives the correlation", "",
            "Every point is a function of its vectors' base norm ‖u‖, relative update size "
            "s = ‖δ‖/‖u‖ and alignment a = cos(δ, u) (metrics.csv: `m0_mean`, `s_mean`, "
            "`align_mean`, `align_abs_mean`). Two exact splits of each Pearson r "
            "(`wda/report/attribution.py`; drivers.csv, drivers_per_step.csv):", "",
            "- **size + alignment + base norm = r**: each point is mapped to its effective layer "
            "(the one (s, a) that a layer of identical vectors of norm `m0_mean` needs to sit "
            "exactly at the point), and the covariance of the points is shared among the three "
            "factors by Shapley values (factors held still at their median over the run). A "
            "factor that does not vary gets 0; a positive part pushes r up;",
            "- **radial + tangential = r**: ΔM = `delta_m_radial` (first order, u·δ/‖u‖) + "
            "`delta_m_tangential` (second order, ‖v‖·ΔD ≈ ‖δ⊥‖²/2‖u‖). The tangential part rises "
            "with ΔD by construction: a negative r needs a radial part that falls as ΔD rises.",
            ""]
    if drivers is None or drivers.empty:
        return "\n".join(head + ["Not computed (the metrics lack the diagnostic columns).", ""])
    rows = [(f.run, f.matrix, f.n, fmt_r(f.pearson_r, f.note), fmt(f.r_size, "+.2f"),
             fmt(f.r_alignment, "+.2f"), fmt(f.r_base_norm, "+.2f"), fmt(f.r_radial, "+.2f"),
             fmt(f.r_tangential, "+.2f"), fmt(f.s_eff_median, ".2g"), fmt(f.s_eff_cv, ".2f"),
             fmt(f.a_eff_median, "+.2f"), fmt(f.a_eff_sd, ".2f"))
            for f in drivers.itertuples()]
    out = head + [
        "Pooled over layers and steps (s and a: median and spread of the effective layers, "
        "CV = sd/mean):", "",
        table(["run", "matrix", "n", "r", "size", "alignment", "base norm", "radial",
               "tangential", "s", "CV of s", "a", "sd of a"], rows,
              [False, False] + [True] * 11), ""]
    if per_step is not None and not per_step.empty:
        summary = []
        for f in drivers.itertuples():
            ps = per_step[(per_step["run"] == f.run) & (per_step["matrix"] == f.matrix)]
            ok = ps[np.isfinite(ps["pearson_r"].to_numpy(dtype=float))]
            med = {c: fmt(ok[c].median(), "+.2f") if len(ok) else NA
                   for c in ("pearson_r", "r_size", "r_alignment", "r_base_norm", "r_radial")}
            summary.append((f.run, f.matrix, len(ok), len(ps), med["pearson_r"], med["r_size"],
                            med["r_alignment"], med["r_base_norm"], med["r_radial"]))
        out += ["Across layers within each step (medians over the steps whose r is defined; "
                "every step in drivers_per_step.csv):", "",
                table(["run", "matrix", "defined steps", "steps", "r", "size", "alignment",
                       "base norm", "radial"], summary, [False, False] + [True] * 7), ""]
    return "\n".join(out)


def _figures_section(figures: Mapping[str, str]) -> str:
    out = ["## Figures", ""]
    if not figures:
        return "\n".join(out + ["No figures.", ""])
    for title, path in figures.items():
        link = quote(str(path), safe="/._-~")  # spaces etc. must not break the link
        image = str(path).lower().endswith((".png", ".svg", ".jpg", ".jpeg", ".gif"))
        out += [f"### {title}", "", f"![{title}]({link})" if image else f"[{title}]({link})", ""]
    return "\n".join(out)


def _reproduce_section(manifest: Mapping) -> str:
    cmd = manifest.get("command")
    if isinstance(cmd, (list, tuple)):
        cmd = shlex.join(str(c) for c in cmd)
    lines = manifest.get("reproduce")
    if not (isinstance(lines, list) and lines):
        lines = [cmd or "# command not recorded"]
    versions = manifest.get("versions") or {}
    out = ["## How to reproduce", "", "```bash", *map(str, lines), "```", "",
           "## Versions", ""]
    if versions:
        out.append(table(["package", "version"], sorted(versions.items())))
    else:
        out.append("Not recorded.")
    return "\n".join(out + [""])


def render_report(metrics: pd.DataFrame, fits: pd.DataFrame,
                  fits_per_step: pd.DataFrame | None, manifest: Mapping,
                  figures: Mapping[str, str], drivers: pd.DataFrame | None = None,
                  drivers_per_step: pd.DataFrame | None = None) -> str:
    """The markdown of report.md (GitHub flavour); writes nothing.

    ``fits`` / ``fits_per_step`` are ``wda.report.fit.fit_groups`` / ``fit_per_step`` output;
    ``figures`` maps a title to a file name relative to report.md; ``drivers`` /
    ``drivers_per_step`` are ``wda.report.attribution.drivers`` output (pooled, per step).
    """
    name = manifest.get("ckpt_dir") or "checkpoints"
    intro = (f"# Weight-decomposition analysis: `{name}`\n\n"
             "Magnitude and direction change of each weight matrix against the pretrained "
             "weights, per layer and training step, after Liu et al., DoRA (Sec. 3.2, Fig. 2).\n")
    parts = [intro, _inputs_section(metrics, manifest), _fits_section(fits, metrics),
             _paper_section(fits), _per_step_section(fits, fits_per_step),
             _drivers_section(drivers, drivers_per_step), _figures_section(figures), _reproduce_section(manifest)]
    return "\n".join(parts).rstrip() + "\n"

"""The report: ``python -m wda.report CKPT_DIR`` (cli.py) and the statistics and figures it writes.

    cli.py          command line, output folder, make_report()
    fit.py          regression lines and correlations per (method, matrix, step)
    resample.py     layer-level inference: cluster bootstrap over layers, permutation p
    attribution.py  what drives the correlation: size / alignment / base-norm and radial / tangential splits
    plot.py         Figure 2 and the other figures
    markdown.py     report.md
    runinfo.py      what was run (adapter settings, learning rates), from the files beside the checkpoints
"""

"""Measuring while training: the same ΔM / ΔD rows, written as the run goes.

    tracker.py      Tracker: measure a live model's modules against their initial weights
    tracked.py      reading a tracker folder back for the report (``--trackers``)
    callbacks.py    Hugging Face Trainer and Lightning callbacks around the Tracker
"""

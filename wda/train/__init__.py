"""Training: the DoRA and LoRA layers and the small runs that make checkpoint sequences.

    cli.py          ``python -m wda.train``: pretrain a base, fine-tune it with FT, LoRA and DoRA
    model.py        the small decoder-only transformer
    corpus.py       the byte-level corpora (pretraining and downstream)
    dora.py         DoRALinear and LoRALinear (paper Eq. 5) and their merges
    adapt.py        putting adapters on a model, saving them in PEFT's format
    sweep.py        many seeds and settings in parallel processes, with their correlations
    controlled.py   ``python -m wda.train.controlled``: the planted-teacher test of the paper's claim
"""

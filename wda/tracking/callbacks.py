"""``wda.Tracker`` as a Hugging Face Trainer callback and a PyTorch Lightning callback.

    from wda.tracking.callbacks import WdaCallback                 # transformers.TrainerCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[WdaCallback("runs/mine/wda", every=50)])

    from wda.tracking.callbacks import WdaLightningCallback        # lightning.pytorch.Callback
    trainer = L.Trainer(max_steps=1000, callbacks=[WdaLightningCallback("runs/mine/wda", every=50)])

Neither framework is a dependency of wda: each class is built on first use, importing its
framework then (one clear error if it is missing). Both take the ``Tracker`` arguments
(``out`` first), or a ready ``tracker=`` (made before any checkpoint is loaded, so that W_0
is the pretrained model when a full fine-tune resumes). Otherwise the tracker is made when
training begins: W_0 is the model as it is then. The measured step is the global optimizer
step (Trainer: ``state.global_step`` in ``on_step_end``; Lightning: ``trainer.global_step``
after each batch, repeats under gradient accumulation do nothing). Every rank runs the
callback (FSDP2 gathers are collective); only the main process writes
(``state.is_world_process_zero`` / ``trainer.is_global_zero``).
"""

from __future__ import annotations

import functools

from wda.errors import WdaError

__all__ = ["WdaCallback", "WdaLightningCallback"]


def __getattr__(name: str):
    if name == "WdaCallback":
        return _hf_callback()
    if name == "WdaLightningCallback":
        return _lightning_callback()
    raise AttributeError(f"module 'wda.tracking.callbacks' has no attribute {name!r}")


class _Tracking:
    """What both callbacks share: the tracker, made from the arguments when training begins."""

    def _setup(self, out, tracker, kwargs) -> None:
        if tracker is None and out is None:
            raise WdaError(None, "give the callback out=DIR (and every=N or steps=[...]) or tracker=Tracker(...)")
        if tracker is not None and (out is not None or kwargs):
            raise WdaError(None, "give the callback either tracker=... or the Tracker's arguments, not both")
        self.tracker, self._out, self._kwargs = tracker, out, kwargs

    def _begin(self, model, write: bool) -> None:
        if self.tracker is None:
            from wda.tracking.tracker import Tracker

            if model is None:
                raise WdaError(None, "the trainer passed no model to the callback", "pass tracker=Tracker(model, ...)")
            self.tracker = Tracker(model, out=self._out, write=write, **self._kwargs)

    def _step(self, step: int) -> None:
        if self.tracker is not None:
            self.tracker.step(int(step))


@functools.cache
def _hf_callback():
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise WdaError(None, "wda.tracking.callbacks.WdaCallback needs transformers", "pip install transformers") from None

    class WdaCallback(TrainerCallback, _Tracking):
        """Record ΔM / ΔD during ``transformers.Trainer.train`` (see ``wda.Tracker``)."""

        def __init__(self, out=None, *, tracker=None, **tracker_kwargs) -> None:
            self._setup(out, tracker, tracker_kwargs)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._begin(model, state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            self._step(state.global_step)

    WdaCallback.__module__ = __name__
    return WdaCallback


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise WdaError(None, "wda.tracking.callbacks.WdaLightningCallback needs PyTorch Lightning",
                           "pip install lightning") from None
    return pl


@functools.cache
def _lightning_callback():
    pl = _lightning()

    class WdaLightningCallback(pl.Callback, _Tracking):
        """Record ΔM / ΔD during ``Trainer.fit`` (see ``wda.Tracker``); the LightningModule
        is the model whose modules are tracked."""

        def __init__(self, out=None, *, tracker=None, **tracker_kwargs) -> None:
            super().__init__()
            self._setup(out, tracker, tracker_kwargs)

        def on_fit_start(self, trainer, pl_module):
            self._begin(pl_module, trainer.is_global_zero)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._step(trainer.global_step)

    WdaLightningCallback.__module__ = __name__
    return WdaLightningCallback

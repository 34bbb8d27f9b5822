"""Produce the checkpoints under study: one pretrained model fine-tuned three ways.

    python -m wda.train --out runs/demo [--seed 0] [--steps 400] [...]

A small byte-level transformer (``wda.train.model``) is pretrained on one corpus (cached: a
second run with the same base options loads it), then fine-tuned on a different corpus
by full fine-tuning (FT), LoRA and DoRA on the attention query/value projections, each
from the same base weights, with the same batches. Output layout (DESIGN.md)::

    OUT/base/model.safetensors + config.json         W_0, tensor names = module names + ".weight"
    OUT/ft/checkpoint-<step>/model.safetensors        full weights
    OUT/lora/checkpoint-<step>/adapter_config.json + adapter_model.safetensors   (PEFT)
    OUT/dora/checkpoint-<step>/...                    (PEFT, use_dora true)
    OUT/train_log.json                                options, seeds, losses per step, timings

Python API: ``train_all(TrainConfig(...))``; pieces: ``load_corpora``, ``pretrain`` /
``load_or_pretrain``, ``finetune`` (one method), ``checkpoint_steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from wda import __version__
from wda.train.adapt import (AdapterSpec, adapter_parameters, add_adapters, matches,
                             norm_bias_parameters, save_adapter, save_norms_biases)
from wda.train.corpus import CORPORA, Corpus, eval_windows, load_corpus, random_batch
from wda.train.model import ModelConfig, Transformer

log = logging.getLogger(__name__)

METHODS = ("ft", "lora", "dora")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
CACHE_FORMAT = 1  # bump when the pretraining code changes what a cached base contains
# Pretrained bases committed with the code (the default options' base, on the stdlib of the
# Python that made it): found by their options and corpus, so the demo and the tests do not
# pretrain. How each was made: bases/README.md.
SHIPPED_BASES = Path(__file__).resolve().parent / "bases"
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run. Fields named ``pretrain_*``, the model shape, ``seq_len``,
    ``dropout``, ``corpus_seed`` and ``val_fraction`` decide the base (and its cache key);
    the rest only the fine-tuning runs."""

    out: str = "runs/default"
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    threads: int = 1  # two threads on a busy 2-core box were measured 12x slower than one
    # model (8 x 96 rather than 4 x 128: twice the points per step for the cross-layer r at
    # about the same cost; see notebooks/LEARNING_PATTERN.md)
    n_layers: int = 8
    d_model: int = 96
    n_heads: int = 4
    mlp_ratio: int = 4
    seq_len: int = 128
    dropout: float = 0.0
    # data
    pretrain_corpus: str = "stdlib"
    downstream_corpus: str = "topics"
    pretrain_max_bytes: int | None = 4_000_000
    downstream_max_bytes: int | None = None
    corpus_seed: int = 0  # file order of the corpora; fixed across training seeds
    val_fraction: float = 0.05
    eval_windows: int = 64
    # pretraining
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_min_lr_ratio: float = 0.1
    pretrain_schedule: str = "cosine"
    pretrain_warmup: int = 50
    pretrain_weight_decay: float = 0.1
    pretrain_beta2: float = 0.95
    pretrain_grad_clip: float = 1.0
    pretrain_seed: int | None = None  # None: same as seed; fix it to share one base across seeds
    # fine-tuning (all three methods)
    steps: int = 300
    batch_size: int = 16
    schedule: str = "linear"
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # fine-tuning; "sgd": SGD with momentum beta1 (pretraining: AdamW)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    ft_lr: float = 2e-4
    lora_lr: float = 1e-3
    dora_lr: float = 1e-3
    dora_magnitude_lr_mult: float = 1.0
    ft_only_targets: bool = False  # FT trains only the target modules (default: everything)
    # LoRA/DoRA also train every norm weight and bias (the paper's VL-BART recipe); FT trains
    # them anyway
    train_norms_biases: bool = False
    # adapters
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module-name suffixes or regexes
    dora_detach_norm: bool = True  # Sec. 4.3: treat ||V'|| as a constant in backprop
    magnitude_only: tuple[str, ...] = ()  # DoRA: modules with a magnitude but no A/B (Table 6)
    # checkpoints: a count ("4": evenly spaced) or a comma list of fractions ("0.5,1.0")
    # and/or steps ("100,200"); the final step is always saved.
    checkpoints: str | int = "0.625,0.75,0.875,1.0"
    save_every: int = 0  # also save every K steps (0: off)
    track_every: int = 10  # wda.Tracker rows every K steps in <run>/tracker/ (0: off)
    eval_every: int = 50
    log_every: int = 50
    cache_dir: str | None = None  # None: $WDA_CACHE_DIR or ~/.cache/wda
    base_dir: str | None = None  # a saved base (model.safetensors + config.json): no pretraining
    use_cache: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("methods", "targets", "magnitude_only"):  # accept lists; stay hashable
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        bad = set(self.methods) - set(METHODS)
        if bad:
            raise ValueError(f"unknown methods {sorted(bad)}; choose from {METHODS}")
        for name in ("schedule", "pretrain_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise ValueError(f"{name} must be one of {SCHEDULES}, not {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        for name in ("pretrain_corpus", "downstream_corpus"):
            if getattr(self, name) not in CORPORA:
                raise ValueError(f"{name} must be one of {sorted(CORPORA)}, not {getattr(self, name)!r}")
        checkpoint_steps(self.checkpoints, self.steps, self.save_every)  # validate early
        self.model_config()

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                           mlp_ratio=self.mlp_ratio, max_seq_len=self.seq_len, dropout=self.dropout)

    def resolved_pretrain_seed(self) -> int:
        return self.seed if self.pretrain_seed is None else self.pretrain_seed


BASE_FIELDS = ("n_layers", "d_model", "n_heads", "mlp_ratio", "seq_len", "dropout",
               "corpus_seed", "val_fraction")


def base_options(cfg: TrainConfig) -> dict[str, Any]:
    """The options that decide the pretrained base (what its cache key is made of)."""
    opts = {f.name: getattr(cfg, f.name) for f in fields(cfg)
            if f.name in BASE_FIELDS or f.name.startswith("pretrain_")}
    opts["pretrain_seed"] = cfg.resolved_pretrain_seed()
    return opts


# ---- schedule and checkpoints --------------------------------------------------------------
def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for update ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the first decayed step
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def checkpoint_steps(spec: str | int, total: int, save_every: int = 0) -> list[int]:
    """Steps to save, sorted: ``"4"`` -> 4 evenly spaced; ``"0.5,1.0"`` -> fractions of
    ``total`` (tokens with a dot); ``"100,200"`` -> steps; plus every ``save_every`` steps.
    The final step is always included."""
    if total < 1:
        raise ValueError(f"need at least one training step, got {total}")
    steps = {total}
    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    if len(tokens) == 1 and "." not in tokens[0]:
        n = int(tokens[0])
        if n < 1:
            raise ValueError(f"checkpoint count must be >= 1, got {n}")
        steps |= {max(1, math.floor(total * k / n + 0.5)) for k in range(1, n + 1)}
    else:
        for t in tokens:
            if "." in t:
                f = float(t)
                if not 0.0 < f <= 1.0:
                    raise ValueError(f"checkpoint fraction {t} is not in (0, 1]")
                steps.add(max(1, math.floor(total * f + 0.5)))
            else:
                s = int(t)
                if not 1 <= s <= total:
                    raise ValueError(f"checkpoint step {s} is not in [1, {total}]")
                steps.add(s)
    if save_every > 0:
        steps |= set(range(save_every, total + 1, save_every))
    return sorted(steps)


# ---- the training loop (shared by pretraining and the three fine-tuning runs) ----------------
@dataclass
class EvalSet:
    """Fixed validation windows of one corpus."""

    name: str
    x: torch.Tensor
    y: torch.Tensor


@torch.no_grad()
def evaluate(model: torch.nn.Module, ev: EvalSet, batch_size: int = 32) -> float:
    """Mean next-byte loss (nats) over the fixed windows of ``ev``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(ev.x), batch_size):
        xb, yb = ev.x[i:i + batch_size], ev.y[i:i + batch_size]
        total += model.loss(xb, yb).item() * len(xb)
    model.train(was_training)
    return total / len(ev.x)


def train_loop(model: Transformer, groups: list[dict], data: torch.Tensor, *, steps: int,
               batch_size: int, seq_len: int, gen: torch.Generator, schedule: str,
               warmup: int, min_lr_ratio: float, betas: tuple[float, float], eps: float,
               grad_clip: float, evals: Sequence[EvalSet], eval_every: int, log_every: int,
               save_at: Sequence[int] = (), save: Callable[[int], None] | None = None,
               on_step: Callable[[int], None] | None = None, tag: str = "train",
               loss_fn: LossFn | None = None, optimizer: str = "adamw") -> dict[str, Any]:
    """AdamW on ``groups`` for ``steps`` updates; evaluate, log and save along the way.
    ``optimizer="sgd"``: ``torch.optim.SGD`` with momentum ``betas[0]`` instead (its weight
    decay is L2, added to the gradient); ``eps`` and ``betas[1]`` are then unused.

    ``loss_fn(model, x, y)`` is the training objective (default: next-byte cross entropy,
    ``model.loss``); the evaluations always report ``model.loss`` on ``evals``.

    Returns the per-step training losses and learning rates, and the evaluations (at step
    0, every ``eval_every`` steps, at every saved step and at the end). ``on_step(done)`` runs
    after every update (the tracker).
    """
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, betas=betas, eps=eps)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=betas[0])
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    peak = [g["lr"] for g in opt.param_groups]
    params = [p for g in groups for p in g["params"]]
    save_at = set(save_at)
    eval_steps = {0, steps} | save_at | (set(range(eval_every, steps, eval_every)) if eval_every else set())
    history: dict[str, Any] = {"train_loss": [], "lr": [], "eval": []}

    def run_eval(step: int) -> None:
        row = {"step": step} | {ev.name: evaluate(model, ev) for ev in evals}
        history["eval"].append(row)
        log.info("%s step %d/%d eval %s", tag, step, steps,
                 " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))

    model.train()
    run_eval(0)
    t0 = time.perf_counter()
    for step in range(steps):
        f = lr_factor(step, steps, schedule, warmup, min_lr_ratio)
        for g, lr in zip(opt.param_groups, peak):
            g["lr"] = lr * f
        x, y = random_batch(data, batch_size, seq_len, gen)
        loss = model.loss(x, y) if loss_fn is None else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        done = step + 1
        history["train_loss"].append(loss.item())
        history["lr"].append(peak[0] * f)
        if on_step is not None:
            on_step(done)
        if log_every and (done % log_every == 0 or done == steps):
            rate = done / (time.perf_counter() - t0)
            log.info("%s step %d/%d loss %.4f lr %.2e (%.1f steps/s)", tag, done, steps,
                     loss.item(), peak[0] * f, rate)
        if done in eval_steps:
            run_eval(done)
        if save is not None and done in save_at:
            save(done)
    history["wall_s"] = time.perf_counter() - t0
    return history


def decay_groups(named: dict[str, torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """nanoGPT's rule: decay matrices (dim >= 2), never norms, biases or vectors."""
    decay = [p for p in named.values() if p.dim() >= 2]
    other = [p for p in named.values() if p.dim() < 2]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": other, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---- data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpora:
    pretrain: Corpus
    downstream: Corpus


def load_corpora(cfg: TrainConfig) -> Corpora:
    """The pretraining and downstream corpora of ``cfg`` (deterministic)."""
    return Corpora(
        load_corpus(cfg.pretrain_corpus, cfg.corpus_seed, cfg.pretrain_max_bytes, cfg.val_fraction),
        load_corpus(cfg.downstream_corpus, cfg.corpus_seed, cfg.downstream_max_bytes, cfg.val_fraction))


def eval_sets(cfg: TrainConfig, corpora: Corpora) -> list[EvalSet]:
    """Validation windows: downstream (the task), then pretrain (forgetting)."""
    out = []
    for key, c in (("downstream_val", corpora.downstream), ("pretrain_val", corpora.pretrain)):
        x, y = eval_windows(c.val, cfg.eval_windows, cfg.seq_len)
        out.append(EvalSet(key, x, y))
    return out


# ---- pretraining (cached) ------------------------------------------------------------------
def pretrain(cfg: TrainConfig, corpora: Corpora) -> tuple[Transformer, dict[str, Any]]:
    """Pretrain a fresh model on ``cfg.pretrain_corpus``; returns it and its history."""
    torch.manual_seed(cfg.resolved_pretrain_seed())
    model = Transformer(cfg.model_config())
    gen = torch.Generator().manual_seed(cfg.resolved_pretrain_seed())
    groups = decay_groups(dict(model.named_parameters()), cfg.pretrain_lr, cfg.pretrain_weight_decay)
    hist = train_loop(
        model, groups, corpora.pretrain.train, steps=cfg.pretrain_steps,
        batch_size=cfg.pretrain_batch_size, seq_len=cfg.seq_len, gen=gen,
        schedule=cfg.pretrain_schedule, warmup=cfg.pretrain_warmup,
        min_lr_ratio=cfg.pretrain_min_lr_ratio, betas=(0.9, cfg.pretrain_beta2), eps=1e-8,
        grad_clip=cfg.pretrain_grad_clip, evals=eval_sets(cfg, corpora)[1:],  # pretrain_val
        eval_every=cfg.eval_every, log_every=cfg.log_every, tag="pretrain")
    hist["eval_windows"] = cfg.eval_windows
    model.eval()
    return model, hist


def cache_key(cfg: TrainConfig, corpora: Corpora, with_torch: bool = True) -> str:
    """Hash of everything that decides the base: options, corpus bytes, code versions.
    Without torch's version: the key of a shipped base (``SHIPPED_BASES``), which any torch
    loads to the same weights."""
    blob = {"options": base_options(cfg), "format": CACHE_FORMAT, "pretrain_corpus": corpora.pretrain.digest()}
    if with_torch:
        blob["torch"] = torch.__version__
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def shipped_base(cfg: TrainConfig, corpora: Corpora) -> Path | None:
    """The base that ships with wda for these options and this corpus, if there is one."""
    entry = SHIPPED_BASES / f"base-{cache_key(cfg, corpora, with_torch=False)}"
    return entry if (entry / "pretrain_log.json").is_file() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("WDA_CACHE_DIR", Path.home() / ".cache" / "wda"))


def state_dict_contiguous(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_base(model: Transformer, out_dir: Path) -> None:
    """``model.safetensors`` (tensor names = module names + ".weight") and ``config.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_contiguous(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "wda-transformer", **asdict(model.cfg)}
    _write_json(out_dir / "config.json", config)


def load_base(base_dir: str | Path) -> Transformer:
    """A ``Transformer`` from a directory written by :func:`save_base`."""
    base_dir = Path(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("model_type", None)
    model = Transformer(ModelConfig(**config))
    model.load_state_dict(load_file(str(base_dir / "model.safetensors")))
    return model.eval()


def given_base(cfg: TrainConfig) -> tuple[Transformer, dict[str, Any]]:
    """The base saved in ``cfg.base_dir`` and the pretraining log beside it (if any); its
    shape must be ``cfg``'s (a mismatch is refused, not silently used)."""
    d = Path(cfg.base_dir)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise ValueError(f"{d}: no saved base here (needs model.safetensors and config.json)")
    model = load_base(d)
    if model.cfg != cfg.model_config():
        raise ValueError(f"{d}/config.json: the base is {asdict(model.cfg)}, the options ask "
                         f"for {asdict(cfg.model_config())}")
    log_path = d / "pretrain_log.json"
    hist = json.loads(log_path.read_text()) if log_path.is_file() else {"eval": []}
    return model, hist | {"cached": True, "cache_path": str(d), "base_dir": str(d)}


def load_or_pretrain(cfg: TrainConfig, corpora: Corpora) -> tuple[Transformer, dict[str, Any]]:
    """The pretrained base: ``cfg.base_dir`` if given, else from the cache when present,
    else trained and cached atomically."""
    if cfg.base_dir is not None:
        return given_base(cfg)
    key = cache_key(cfg, corpora)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    entry = cache / f"base-{key}"
    if cfg.use_cache and not (entry / "pretrain_log.json").is_file():
        entry = shipped_base(cfg, corpora) or entry  # the default base ships with wda
    if cfg.use_cache and (entry / "pretrain_log.json").is_file():
        log.info("pretrained base from cache %s", entry)
        hist = json.loads((entry / "pretrain_log.json").read_text())
        return load_base(entry), hist | {"cached": True, "cache_path": str(entry)}
    model, hist = pretrain(cfg, corpora)
    hist |= {"cache_key": key, "options": base_options(cfg)}
    if cfg.use_cache:
        # Write into a temporary sibling, then rename: readers never see a half-written base,
        # and a concurrent run that finished first simply wins.
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=cache))
        save_base(model, tmp)
        _write_json(tmp / "pretrain_log.json", hist)
        try:
            os.rename(tmp, entry)
            log.info("cached pretrained base at %s", entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, hist | {"cached": False, "cache_path": str(entry) if cfg.use_cache else None}


# ---- fine-tuning ---------------------------------------------------------------------------
def adapter_spec(cfg: TrainConfig, method: str) -> AdapterSpec:
    """The ``wda.train.adapt.AdapterSpec`` of a LoRA or DoRA run."""
    return AdapterSpec(method=method, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                       use_rslora=cfg.use_rslora, detach_norm=cfg.dora_detach_norm,
                       targets=tuple(cfg.targets),
                       magnitude_only=tuple(cfg.magnitude_only) if method == "dora" else ())


def param_groups(cfg: TrainConfig, method: str,
                 model: Transformer) -> tuple[list[dict], AdapterSpec | None, list[str]]:
    """Prepare ``model`` for ``method`` (adapters added in place for LoRA/DoRA) and return
    the optimizer's param groups, the adapter spec (None for FT) and the adapted modules."""
    if method == "ft":
        named = dict(model.named_parameters())
        modules: list[str] = []
        if cfg.ft_only_targets:  # the adapters' target rule, so FT trains the same modules
            named = {k: p for k, p in named.items() if k.endswith(".weight")
                     and any(matches(k.removesuffix(".weight"), t) for t in cfg.targets)}
            for k, p in model.named_parameters():
                p.requires_grad_(k in named)
            modules = [k.removesuffix(".weight") for k in named]
        return decay_groups(named, cfg.ft_lr, cfg.weight_decay), None, modules
    spec = adapter_spec(cfg, method)
    modules = add_adapters(model, spec)
    named = adapter_parameters(model)
    lr = cfg.lora_lr if method == "lora" else cfg.dora_lr
    mags = {k: p for k, p in named.items() if "lora_magnitude_vector" in k}
    groups = decay_groups({k: p for k, p in named.items() if k not in mags}, lr, cfg.weight_decay)
    if mags:
        # Own group so dora_magnitude_lr_mult applies; a magnitude is a vector: no decay.
        groups.append({"params": list(mags.values()), "lr": lr * cfg.dora_magnitude_lr_mult,
                       "weight_decay": 0.0})
    if cfg.train_norms_biases:
        extra = norm_bias_parameters(model)
        for p in extra.values():
            p.requires_grad_(True)
        if extra:
            groups.append({"params": list(extra.values()), "lr": lr, "weight_decay": 0.0})
    return groups, spec, modules


def finetune(cfg: TrainConfig, method: str, base: Transformer, corpora: Corpora,
             out_dir: str | Path | None = None,
             loss_fn: LossFn | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Fine-tune a copy of ``base`` by ``method`` ("ft", "lora" or "dora") on the downstream
    corpus, saving ``out_dir/checkpoint-<step>/`` at the configured steps (if ``out_dir``).
    ``loss_fn``: the objective (see :func:`train_loop`; default next-byte cross entropy).

    Returns the trained model (adapters still in place for LoRA/DoRA) and its history.
    Seeds torch's global RNG (adapter init, dropout) from ``cfg.seed`` and the method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model = Transformer(base.cfg)
    model.load_state_dict(base.state_dict())
    # Same batches for every method (one generator seed); method-specific init seed.
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed * 1000 + METHODS.index(method))
    groups, spec, modules = param_groups(cfg, method, model)
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    log.info("%s: %d trainable parameters, %d adapted modules", method, n_trainable, len(modules))

    save_at = checkpoint_steps(cfg.checkpoints, cfg.steps, cfg.save_every)
    save = tracker = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        if cfg.track_every > 0:  # dense trajectories besides the checkpoints; W_0 = base now
            from wda.tracking.tracker import Tracker

            tracker = Tracker(model, modules or list(cfg.targets), every=cfg.track_every,
                              out=out_dir / "tracker", run=method)

        def save(step: int) -> None:
            ckpt = out_dir / f"checkpoint-{step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            if spec is None:
                save_file(state_dict_contiguous(model), str(ckpt / "model.safetensors"),
                          metadata={"format": "pt"})
            else:
                save_adapter(model, ckpt, spec)
                if cfg.train_norms_biases:
                    save_norms_biases(model, ckpt)

    hist = train_loop(
        model, groups, corpora.downstream.train, steps=cfg.steps, batch_size=cfg.batch_size,
        seq_len=cfg.seq_len, gen=gen, schedule=cfg.schedule, warmup=cfg.warmup,
        min_lr_ratio=cfg.min_lr_ratio, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        grad_clip=cfg.grad_clip, evals=eval_sets(cfg, corpora), eval_every=cfg.eval_every,
        log_every=cfg.log_every, save_at=save_at, save=save,
        on_step=tracker.step if tracker is not None else None, tag=method, loss_fn=loss_fn,
        optimizer=cfg.optimizer)
    model.eval()
    hist |= {"method": method, "trainable_params": n_trainable, "modules": modules,
             "checkpoint_steps": save_at, "peak_lr": [g["lr"] for g in groups]}
    if tracker is not None:
        hist["tracker_s"] = tracker.seconds
    return model, hist


# ---- everything ----------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _prepare_out(out: Path, methods: Sequence[str], overwrite: bool) -> None:
    for name in ("base", *methods):
        d = out / name
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{d} is not empty (pass overwrite=True / --overwrite)")
            shutil.rmtree(d)  # stale checkpoints of another config must not mix with these


def train_all(cfg: TrainConfig, out: str | Path | None = None) -> Path:
    """Pretrain (or load from cache), then fine-tune by every method in ``cfg.methods``.

    Sets torch's thread count to ``cfg.threads`` (process-wide). Returns the output dir.
    """
    out = Path(out if out is not None else cfg.out)
    cfg = dataclasses.replace(cfg, out=str(out))
    _prepare_out(out, cfg.methods, cfg.overwrite)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    corpora = load_corpora(cfg)
    t_data = time.perf_counter() - t0
    base, pre_hist = load_or_pretrain(cfg, corpora)
    t_pre = time.perf_counter() - t0 - t_data
    save_base(base, out / "base")
    runs = {}
    for method in cfg.methods:
        _, hist = finetune(cfg, method, base, corpora, out / method)
        runs[method] = hist
        first, last = hist["eval"][0], hist["eval"][-1]
        log.info("%s: downstream val loss %.4f -> %.4f in %.1f s", method,
                 first["downstream_val"], last["downstream_val"], hist["wall_s"])
    record = {
        "config": asdict(cfg),
        "seeds": {"seed": cfg.seed, "pretrain_seed": cfg.resolved_pretrain_seed(),
                  "corpus_seed": cfg.corpus_seed},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "wda": __version__},
        "corpora": {k: {"name": c.name, "train_bytes": len(c.train), "val_bytes": len(c.val),
                        "sha256": c.digest()}
                    for k, c in (("pretrain", corpora.pretrain), ("downstream", corpora.downstream))},
        "pretrain": pre_hist,
        "runs": runs,
        "timings_s": {"data": t_data, "pretrain": t_pre, "total": time.perf_counter() - t0}
                     | {m: h["wall_s"] for m, h in runs.items()},
    }
    _write_json(out / "train_log.json", record)
    return out


# ---- CLI -----------------------------------------------------------------------------------
HELP = {
    "out": "output directory (base/, ft/, lora/, dora/, train_log.json)",
    "methods": "fine-tuning runs to make", "seed": "fine-tuning seed (batches, adapter init)",
    "threads": "torch threads (1 is fastest on a busy 2-core box)",
    "n_layers": "transformer blocks", "d_model": "model width", "n_heads": "attention heads",
    "mlp_ratio": "MLP hidden width / d_model", "seq_len": "context length (bytes)",
    "dropout": "model dropout (pretraining and fine-tuning)",
    "val_fraction": "tail of each corpus held out for validation",
    "pretrain_steps": "pretraining steps", "pretrain_batch_size": "pretraining batch size",
    "pretrain_lr": "peak pretraining lr", "pretrain_min_lr_ratio": "final lr / peak lr",
    "pretrain_warmup": "pretraining warmup steps", "pretrain_weight_decay": "AdamW decay on matrices",
    "pretrain_beta2": "AdamW beta2 of pretraining", "pretrain_grad_clip": "max grad norm (0: off)",
    "batch_size": "fine-tuning batch size", "beta1": "AdamW beta1 (SGD: the momentum)",
    "optimizer": f"fine-tuning optimizer, one of {OPTIMIZERS} (pretraining: AdamW)", "beta2": "AdamW beta2",
    "eps": "AdamW eps", "lora_dropout": "dropout on the adapter input",
    "pretrain_corpus": f"one of {sorted(CORPORA)}", "downstream_corpus": f"one of {sorted(CORPORA)}",
    "pretrain_max_bytes": "cap on the corpus size ('none': all of it)",
    "downstream_max_bytes": "cap on the corpus size ('none': all of it)",
    "corpus_seed": "file order of both corpora (fixed across training seeds)",
    "eval_windows": "validation windows per corpus for the logged eval losses",
    "pretrain_schedule": f"one of {SCHEDULES}", "schedule": f"one of {SCHEDULES}",
    "pretrain_seed": "seed of the base (None: --seed; fix it, e.g. 0, to fine-tune several "
                     "--seed values from one shared base)",
    "steps": "fine-tuning steps (each method)", "warmup": "linear warmup steps",
    "min_lr_ratio": "final lr / peak lr of the decaying schedules",
    "weight_decay": "AdamW decay on matrices (never on norms or DoRA magnitudes)",
    "grad_clip": "max grad norm (0: off)", "ft_lr": "peak lr of full fine-tuning",
    "lora_lr": "peak lr of LoRA", "dora_lr": "peak lr of DoRA's A and B",
    "dora_magnitude_lr_mult": "DoRA magnitude lr = dora_lr * this",
    "ft_only_targets": "FT trains only the --targets modules (default: all weights)",
    "train_norms_biases": "LoRA/DoRA also train all norm weights and biases (no decay, the "
                          "adapter lr); saved beside each adapter as norms_biases.safetensors",
    "rank": "adapter rank r", "alpha": "adapter alpha (scaling alpha/r)",
    "use_rslora": "scaling alpha/sqrt(r)", "targets": "modules to adapt: name suffixes or regexes",
    "dora_detach_norm": "treat ||W0 + sBA|| as a constant in backprop (paper Sec. 4.3)",
    "magnitude_only": "DoRA modules with a trainable magnitude but no A/B",
    "checkpoints": "count ('4': evenly spaced) or comma list of fractions ('0.5,1.0') "
                   "and/or steps ('100,200'); the final step is always saved",
    "save_every": "also save every K steps (0: off)",
    "track_every": "measure ΔM / ΔD every K steps while training, into <run>/tracker/ (0: off)",
    "eval_every": "eval every K steps (0: "
    "only at start, checkpoints and end)", "log_every": "log a line every K steps (0: off)",
    "cache_dir": "pretrained-base cache (None: $WDA_CACHE_DIR or ~/.cache/wda)",
    "use_cache": "load / store the pretrained base in the cache",
    "base_dir": "use this saved base (model.safetensors + config.json, e.g. a run's base/) "
                "instead of pretraining; the model shape options must match its config.json",
    "overwrite": "replace existing base/ and run folders in --out",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wda.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kw: dict[str, Any] = {"default": default, "help": HELP[f.name]}
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=_csv, metavar="A,B", **kw)
        elif f.name in ("pretrain_max_bytes", "downstream_max_bytes", "pretrain_seed"):
            p.add_argument(flag, type=_int_or_none, **kw)
        elif f.name in ("cache_dir", "base_dir"):
            p.add_argument(flag, type=str, **kw)
        else:
            p.add_argument(flag, type=type(default), **kw)
    return p


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _int_or_none(s: str) -> int | None:
    return None if s.lower() == "none" else int(s)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = TrainConfig(**vars(args))
        out = train_all(cfg)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((out / "train_log.json").read_text())
    pre = record["pretrain"]
    if pre.get("eval"):
        print(f"base: pretrain loss {pre['eval'][0]['pretrain_val']:.3f} -> "
              f"{pre['eval'][-1]['pretrain_val']:.3f}" + (" (cached)" if pre["cached"] else ""))
    else:
        print(f"base: {pre['cache_path']}")
    for m, h in record["runs"].items():
        a, b = h["eval"][0], h["eval"][-1]
        print(f"{m:5s} downstream val {a['downstream_val']:.3f} -> {b['downstream_val']:.3f}, "
              f"pretrain val {a['pretrain_val']:.3f} -> {b['pretrain_val']:.3f}, "
              f"{h['wall_s']:.1f} s, checkpoints {h['checkpoint_steps']}")
    print(f"total {record['timings_s']['total']:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

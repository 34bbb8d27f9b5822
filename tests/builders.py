"""Real-format checkpoint directories for the tests, written with transformers + peft.

Tiny randomly initialised models, no hub. Every builder returns what it wrote so tests
can compute independent float64 references.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

Q_V = ["q_proj", "v_proj"]


class ChatGLMStandIn(torch.nn.Module):
    """Some modules of a ChatGLM under ChatGLM's names, ``transformer.encoder.layers.<i>``:
    ``block()`` makes one layer's. ``save_pretrained`` writes the weights as one
    model.safetensors (ChatGLM's modelling code is not in transformers)."""

    def __init__(self, block, layers: int) -> None:
        super().__init__()
        blocks = torch.nn.ModuleList(block() for _ in range(layers))
        self.transformer = torch.nn.Module()
        self.transformer.encoder = torch.nn.Module()
        self.transformer.encoder.layers = blocks

    def save_pretrained(self, path: Path, **_) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")


def plain_reference(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, float, int]:
    """Eqs. 3-4 written out in float64, zero-norm rows left out (the textbook form):
    (ΔM, ΔD, rows excluded)."""
    a, b = w0.double(), wt.double()
    n0, nt = a.norm(dim=1), b.norm(dim=1)
    keep = (n0 > 0) & (nt > 0)
    cos = (a[keep] * b[keep]).sum(1) / (n0[keep] * nt[keep])
    return float((nt[keep] - n0[keep]).abs().mean()), float((1 - cos).mean()), int((~keep).sum())


def tiny_llama(seed: int = 0, layers: int = 3):
    """LlamaForCausalLM: q_proj (48, 48), non-square v_proj (12, 48) (one kv head of 12)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, vocab_size=64,
                      max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def save_full(model, path: Path, **kw) -> None:
    model.save_pretrained(path, **kw)


def perturb_(params, scale: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def ft_checkpoints(model, run_dir: Path, steps=(10, 20, 30), scale=0.02, seed=1, legacy_bin=False,
                   **save_kw):
    """Full fine-tuning run: the model drifts a little more at each step. Returns {step: state_dict}.
    ``legacy_bin``: write ``pytorch_model.bin`` with torch.save (transformers 5 writes safetensors only)."""
    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    out = {}
    for step in steps:
        perturb_([p for n, p in m.named_parameters() if p.dim() == 2], scale, gen)
        if legacy_bin:
            (run_dir / f"checkpoint-{step}").mkdir(parents=True)
            torch.save(m.state_dict(), run_dir / f"checkpoint-{step}" / "pytorch_model.bin")
        else:
            m.save_pretrained(run_dir / f"checkpoint-{step}", **save_kw)
        out[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return out


def peft_checkpoints(model, run_dir: Path, config, steps=(10, 20), scale=0.05, seed=2):
    """An adapter run written by PEFT itself. Returns {step: merged float64 state dict}
    computed by PEFT's own merge_and_unload() on a float64 copy."""
    from peft import get_peft_model

    gen = torch.Generator().manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    out = {}
    for step in steps:
        # B starts at zero in PEFT: perturb every adapter tensor so the update is not zero
        perturb_([p for n, p in pm.named_parameters() if "lora_" in n], scale, gen)
        pm.save_pretrained(run_dir / f"checkpoint-{step}")
        ref = copy.deepcopy(pm).double().merge_and_unload()
        out[step] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    return out


def qv_runs(d: Path, layers: int = 2) -> Path:
    """A small complete directory: tiny Llama base, ``ft`` (full weights, steps 10/20), and
    PEFT ``lora`` / ``dora`` runs on q_proj and v_proj (steps 10/20)."""
    from peft import LoraConfig

    model = tiny_llama(layers=layers)
    save_full(model, d / "base")
    ft_checkpoints(model, d / "ft", steps=(10, 20), scale=0.004)
    peft_checkpoints(model, d / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=Q_V))
    peft_checkpoints(model, d / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=Q_V, use_dora=True),
                     seed=3)
    return d


def diagnostics_reference(w0: torch.Tensor, wt: torch.Tensor) -> dict[str, float]:
    """The per-module diagnostics written out in float64 from their definitions, per row
    u = W_0^n, v = W_t^n, δ = v - u (zero-norm rows left out): mean ||δ||/||u||, mean
    cos(δ, u) and its |.|, and ΔM's parts mean sign(Δm)·u·δ/||u|| and
    mean sign(Δm)·||v||·(1 - cos(u, v))."""
    u, v = w0.double(), wt.double()
    n0, nt = u.norm(dim=1), v.norm(dim=1)
    keep = (n0 > 0) & (nt > 0)
    u, v, n0, nt = u[keep], v[keep], n0[keep], nt[keep]
    d = v - u
    nd = d.norm(dim=1)
    ud = (u * d).sum(1)
    align = torch.where(nd > 0, ud / (n0 * torch.where(nd > 0, nd, 1.0)), 0.0)
    sign = torch.sign(nt - n0)
    cos = (u * v).sum(1) / (n0 * nt)
    return {"s_mean": float((nd / n0).mean()), "align_mean": float(align.mean()),
            "align_abs_mean": float(align.abs().mean()),
            "delta_m_radial": float((sign * ud / n0).mean()),
            "delta_m_tangential": float((sign * nt * (1 - cos)).mean())}


def trainer_run(model, output_dir: Path, peft_config=None, max_steps: int = 4, save_steps: int = 2,
                lr: float = 1e-2, seed: int = 0, final_only: bool = False):
    """A real ``transformers.Trainer`` run on random tokens, checkpoints as Trainer writes
    them (``output_dir/checkpoint-<step>/``, trainer_state.json, optimizer.pt, ...).

    Returns ``(refs, log_history)``: ``refs[step]`` the model's weights when that checkpoint
    was saved, as a float64 state dict (adapters merged by PEFT's own merge_and_unload on a
    float64 copy), taken in memory by a callback, not read back from the files; and the
    Trainer's own log history. ``final_only``: no checkpoint-<step>/ folders, only
    ``trainer.save_model()`` and ``trainer.save_state()`` into output_dir after training."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    refs: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            m = copy.deepcopy(model).double()
            if peft_config is not None:
                m = m.merge_and_unload()
            refs[state.global_step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4 * max_steps, 8), generator=gen)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=save_steps,
                             save_strategy="no" if final_only else "steps", logging_steps=1, per_device_train_batch_size=4, learning_rate=lr,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                      callbacks=[Snapshot()])
    trainer.train()
    if final_only:
        trainer.save_model()
        trainer.save_state()
        Snapshot().on_save(args, trainer.state, None, model=trainer.model)
    return refs, list(trainer.state.log_history)


def hub_cached(model, cache: Path, repo_id: str, sha: str = "0123456789abcdef0123456789abcdef01234567",
               refs: tuple[str, ...] = ("main",)) -> Path:
    """``model`` saved into a Hugging Face hub cache laid out as huggingface_hub lays it out:
    ``models--org--name/blobs/<sha256>``, ``snapshots/<sha>/<file>`` links to the blobs,
    ``refs/<name>`` holding the commit sha. Returns the snapshot folder."""
    import hashlib
    import tempfile

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            data = f.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / digest).write_bytes(data)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)
    return snap


def one_line_error(rc: int, err: str, *words: str) -> str:
    """A CLI failure as the project promises it: exit status 2 and one line on stderr (no
    traceback) holding every one of ``words``. Returns the line."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], f"{w!r} missing from: {lines[0]}"
    return lines[0]


def dry_run_error(capsys, d: Path, *words: str) -> str:
    """``wda.report D --dry-run`` fails with ``one_line_error``."""
    from wda.report.cli import main

    rc = main([str(d), "--dry-run"])
    return one_line_error(rc, capsys.readouterr().err, *words)


# ---- the DoRA reference code's format (NVlabs/DoRA's PEFT fork, FORMATS.md §1) ----------------
NVLABS_R, NVLABS_ALPHA = 4, 8


def write_nvlabs(ck: Path, factors: dict, magnitudes: dict, config: dict, llava: bool = False) -> None:
    """One checkpoint as the fork saves it: ``adapter_config.json`` (sorted keys, indent 2),
    ``adapter_model.bin`` (torch pickle) keyed ``base_model.model.<module>.lora_A.weight`` etc.
    ``llava``: the magnitudes go to ``non_lora_trainables.bin`` under ``.default`` names, as the
    LLaVA script's filter (it keeps "weight_g_wdecomp", not the parameter's real name) leaves them."""
    ck.mkdir(parents=True)
    cfg = {"peft_type": "DORA", "task_type": "CAUSAL_LM", "r": NVLABS_R, "lora_alpha": NVLABS_ALPHA,
           "lora_dropout": 0.05,
           "dora_simple": True, "merge_weights": False, "fan_in_fan_out": False, "enable_lora": None,
           "bias": "none", "modules_to_save": None, "inference_mode": True,
           "base_model_name_or_path": "yahma/llama-7b-hf", **config}
    (ck / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd, extra = {}, {}
    for mod, (a, b) in factors.items():
        sd[f"base_model.model.{mod}.lora_A.weight"] = a
        sd[f"base_model.model.{mod}.lora_B.weight"] = b
    for mod, m in magnitudes.items():
        if llava:
            extra[f"base_model.model.{mod}.weight_m_wdecomp.default.weight"] = m
        else:
            sd[f"base_model.model.{mod}.weight_m_wdecomp.weight"] = m
    torch.save(sd, ck / "adapter_model.bin")
    if llava:
        extra["base_model.model.model.mm_projector.0.weight"] = torch.zeros(3, 3)  # other trainables
        torch.save(extra, ck / "non_lora_trainables.bin")


def merge_eq5(w0: torch.Tensor, a, b, m: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 5 of the paper in float64: m · V / ||V|| per output row, V = W_0 + s·B·A (or W_0)."""
    v = w0.double() if a is None else w0.double() + scaling * (b.double() @ a.double())
    return m.double().reshape(-1, 1) * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def nvlabs_run(d: Path, model, steps=(10, 20), seed=4, llava=False, config=None, scale=0.05,
               r: int = NVLABS_R, alpha: float = NVLABS_ALPHA, bare: bool = False):
    """A run of DoRA on q/k/v and magnitude-only o_proj/up_proj (the paper's qkv script's
    split), with trained-looking A, B and m, rank ``r``. ``bare``: one checkpoint written into
    ``d`` itself (as the released weights are, no checkpoint-<step>/), else one
    ``d/checkpoint-<step>/`` per step. Returns {step: {module: merged float64 weight}}."""
    config = {**(config or {"target_modules": ["q_proj", "k_proj", "v_proj"],
                            "Wdecompose_target_modules": ["o_proj", "up_proj"]}), "r": r, "lora_alpha": alpha}
    assert not bare or len(steps) == 1
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    mods = [k[:-7] for k in sd if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    mag_only = [k[:-7] for k in sd if k.endswith(("o_proj.weight", "up_proj.weight"))]
    out = {}
    for step in steps:
        factors = {mod: (torch.randn(r, sd[mod + ".weight"].shape[1], generator=gen) * scale,
                         torch.randn(sd[mod + ".weight"].shape[0], r, generator=gen) * scale) for mod in mods}
        mags = {}
        for mod in mods + mag_only:
            w0 = sd[mod + ".weight"]
            mags[mod] = (w0.norm(dim=1, keepdim=True) * (1 + 0.05 * torch.randn(w0.shape[0], 1, generator=gen)))
        write_nvlabs(d if bare else d / f"checkpoint-{step}", factors, mags, config, llava=llava)
        out[step] = {mod: merge_eq5(sd[mod + ".weight"], *factors.get(mod, (None, None)), mags[mod], alpha / r)
                     for mod in mods + mag_only}
    return out

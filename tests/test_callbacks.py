"""The README's "Measure while training" snippets, run as written on tiny models; the
callbacks' rank-0 rule; wda imports without transformers or Lightning."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from builders import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(title: str) -> str:
    """The README's python block whose first line is ``# measure while training: <title>``."""
    blocks = re.findall(r"```python\n(# measure while training: (.*?)\n.*?)```", README.read_text(), re.S)
    found = {name: code for code, name in blocks}
    assert title in found, sorted(found)
    return found[title]


def _peft_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_llama(layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _dataset(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def check_rows(path: Path, steps: list[int], method: str) -> pd.DataFrame:
    rows = pd.read_csv(path)
    assert sorted(set(rows["step"])) == steps
    assert set(rows["method"]) == {method} and len(rows) == 4 * len(steps)  # 2 layers x q, v
    assert set(rows["module"]) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert (rows["delta_m"] > 0).all() and (rows["delta_d"] > 0).all()
    return rows


def test_readme_plain_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _peft_model()
    data = _dataset()
    loader = [{"input_ids": torch.stack([d["input_ids"] for d in data[i:i + 4]]),
               "labels": torch.stack([d["labels"] for d in data[i:i + 4]])} for i in range(0, 16, 4)] * 5
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    exec(snippet("plain loop"), {"model": model, "loader": loader, "optimizer": optimizer})
    check_rows(tmp_path / "runs/mine/tracker/metrics.csv", [10, 20], "LoRA")


def test_readme_hugging_face_trainer_and_report(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns = {"model": _peft_model(), "train_dataset": _dataset()}
    exec(snippet("Hugging Face Trainer"), ns)
    check_rows(tmp_path / "runs/hf/tracker/metrics.csv", [10, 20, 30, 40], "LoRA")
    from wda.report.cli import main

    assert main(["runs/hf/tracker", "--out", "reports/hf", "--no-progress", "--bootstrap", "50", "--no-figures"]) == 0
    assert {"report.md", "fits.csv"} <= {p.name for p in (tmp_path / "reports/hf").iterdir()}


def test_readme_lightning(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _peft_model()

        def training_step(self, batch, batch_idx):
            return self.net(**batch).loss

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    loader = torch.utils.data.DataLoader(_dataset(), batch_size=4)
    exec(snippet("PyTorch Lightning"), {"lit_module": Lit(), "train_loader": loader})
    rows = pd.read_csv(tmp_path / "runs/pl/tracker/metrics.csv")
    assert sorted(set(rows["step"])) == [10, 20, 30, 40] and set(rows["method"]) == {"LoRA"}
    # a LightningModule's own names: the PEFT model sits under its attribute
    assert set(rows["module"]) == {f"net.base_model.model.model.layers.{i}.self_attn.{m}"
                                   for i in (0, 1) for m in ("q_proj", "v_proj")}


def test_the_hugging_face_callback_writes_on_the_main_process_only(tmp_path):
    from types import SimpleNamespace

    from wda.tracking.callbacks import WdaCallback

    model = _peft_model()
    for main, out in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        cb = WdaCallback(out, every=1)
        state = SimpleNamespace(is_world_process_zero=main, global_step=0)
        cb.on_train_begin(None, state, None, model=model)
        state.global_step = 1
        cb.on_step_end(None, state, None)
        assert cb.tracker.write is main and (out / "metrics.csv").exists() is main
    assert len(pd.read_csv(tmp_path / "rank0" / "metrics.csv")) == 4


def test_missing_frameworks_are_one_clear_line_and_wda_imports_without_them():
    code = ("import sys\n"
            "for m in ('transformers', 'peft', 'lightning', 'pytorch_lightning'): sys.modules[m] = None\n"
            "import torch, wda\n"
            "from wda.errors import WdaError\n"
            "from wda.tracking import callbacks\n"
            "t = wda.Tracker(torch.nn.ModuleDict({'q_proj': torch.nn.Linear(3, 2)}), every=1, out=sys.argv[1])\n"
            "t.step(1)\n"
            "for name in ('WdaCallback', 'WdaLightningCallback'):\n"
            "    try:\n"
            "        getattr(callbacks, name)\n"
            "    except WdaError as e:\n"
            "        print(e)\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = subprocess.run([sys.executable, "-c", code, str(Path(d) / "t")], capture_output=True, text=True,
                           timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(README.parent)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == [
        "wda.tracking.callbacks.WdaCallback needs transformers (pip install transformers)",
        "wda.tracking.callbacks.WdaLightningCallback needs PyTorch Lightning (pip install lightning)"]

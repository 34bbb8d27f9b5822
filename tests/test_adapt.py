"""Model surgery and the PEFT on-disk format, checked against real PEFT on a tiny random Llama."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from wda.train.adapt import (AdapterSpec, adapter_modules, adapter_parameters, add_adapters,
                       load_adapter, matches, merge_adapters, save_adapter)
from wda.train.dora import DoRALinear, LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-5}
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations


@pytest.fixture(scope="module")
def base_model() -> nn.Module:
    torch.manual_seed(0)
    # q_proj is 64 -> 64, k/v_proj 64 -> 32, MLP 64 <-> 96: non-square weights catch axis bugs.
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def perturb(params, seed: int = 2) -> None:
    """Random nonzero A, B and m so that no adapter is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if type(m) is nn.Linear}


# ---------------------------------------------------------------- surgery

def test_target_rule():
    name = "model.layers.0.self_attn.q_proj"
    assert matches(name, "q_proj") and matches(name, "self_attn.q_proj") and matches(name, name)
    assert matches(name, r"model\.layers\.0\..*_proj")
    assert not matches(name, "proj")  # a suffix must start at a dot
    assert not matches(name, r"layers\.0\..*")  # regexes must match the whole name
    assert not matches(name, "q_proj(")  # an invalid regex is just not a match


def test_add_adapters_wraps_targets_and_freezes_the_rest(base_model, ids):
    model = copy.deepcopy(base_model)
    expected = logits(model, ids)
    spec = AdapterSpec("dora", r=4, targets=("q_proj", r".*\.1\.mlp\.up_proj"),
                       magnitude_only=("o_proj",))
    names = add_adapters(model, spec)
    assert names == [n for n, _ in model.named_modules() if isinstance(_, (LoRALinear, DoRALinear))]
    assert sorted(names) == sorted(
        [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in ("q_proj", "o_proj")]
        + ["model.layers.1.mlp.up_proj"])
    assert all(adapter_modules(model)[n].magnitude_only == n.endswith("o_proj") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in trainable
    assert "model.layers.0.self_attn.o_proj.lora_magnitude_vector" in trainable
    assert not any(n.startswith("model.layers.0.self_attn.o_proj.lora_") and "magnitude" not in n
                   for n in trainable)
    torch.testing.assert_close(logits(model, ids), expected, **TOL)  # DoRA at init == base
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_adapters(copy.deepcopy(base_model), AdapterSpec("lora", targets=("proj",)))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_adapters_equals_forward(base_model, ids, method):
    model = copy.deepcopy(base_model)
    add_adapters(model, AdapterSpec(method, r=4, targets=("q_proj", "v_proj", "down_proj")))
    perturb(adapter_parameters(model).items())
    expected = logits(model, ids)
    assert merge_adapters(model) is model
    assert not adapter_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, ids), expected, **TOL)


# ---------------------------------------------------------------- wda -> PEFT

WDA_SPECS = {
    "lora": AdapterSpec("lora", r=4, alpha=8.0),
    "lora_rslora": AdapterSpec("lora", r=4, alpha=8.0, use_rslora=True, targets=("q_proj", "k_proj")),
    "dora": AdapterSpec("dora", r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj")),
    "dora_rslora": AdapterSpec("dora", r=8, alpha=4.0, use_rslora=True, dropout=0.05),
    "dora_magnitude_only": AdapterSpec("dora", r=4, alpha=8.0, targets=("q_proj", "v_proj"),
                                       magnitude_only=("k_proj", "o_proj", "gate_proj")),
}


@pytest.mark.parametrize("key", list(WDA_SPECS))
def test_wda_adapter_loads_in_peft(base_model, ids, tmp_path, key):
    spec = WDA_SPECS[key]
    model = copy.deepcopy(base_model)
    add_adapters(model, spec)
    perturb(adapter_parameters(model).items())
    save_adapter(model, tmp_path, spec)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (spec.method == "dora") and cfg["peft_type"] == "LORA"

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), **TOL)
    merged_peft = linear_weights(peft_model.merge_and_unload())
    merged_wda = linear_weights(merge_adapters(model))
    assert merged_peft.keys() == merged_wda.keys()
    for name in merged_wda:
        torch.testing.assert_close(merged_peft[name], merged_wda[name], **TOL)


@pytest.mark.parametrize("key", ["lora_rslora", "dora_magnitude_only"])
def test_wda_round_trip_keeps_spec_and_outputs(base_model, ids, tmp_path, key):
    spec = WDA_SPECS[key]
    model = copy.deepcopy(base_model)
    add_adapters(model, dataclasses.replace(spec, detach_norm=False))
    perturb(adapter_parameters(model).items())
    save_adapter(model, tmp_path, dataclasses.replace(spec, detach_norm=False))
    fresh = copy.deepcopy(base_model)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded == dataclasses.replace(spec, detach_norm=False)
    assert sorted(adapter_modules(fresh)) == sorted(adapter_modules(model))
    for name, mod in adapter_modules(fresh).items():
        assert getattr(mod, "magnitude_only", False) == any(name.endswith(p) for p in spec.magnitude_only)
        assert getattr(mod, "detach_norm", False) is False
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), **TOL)
    assert set(adapter_parameters(fresh)) == {n for n, p in fresh.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- PEFT -> wda

@pytest.mark.parametrize("use_dora,magnitude_key", [
    (False, None), (True, "lora_magnitude_vector"), (True, "lora_magnitude_vector.weight")])
def test_peft_adapter_loads_in_wda(base_model, ids, tmp_path, use_dora, magnitude_key):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, use_rslora=use_dora,
                             target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                             rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0})
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), config)
    perturb(peft_model.named_parameters(), seed=5)
    peft_model.save_pretrained(tmp_path)
    if magnitude_key == "lora_magnitude_vector.weight":  # other exporters write the magnitude with ".weight"
        from safetensors.torch import load_file, save_file

        path = tmp_path / "adapter_model.safetensors"
        tensors = {k.replace("lora_magnitude_vector", magnitude_key): v
                   for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})

    model = copy.deepcopy(base_model)
    spec = load_adapter(model, tmp_path)
    assert spec.method == ("dora" if use_dora else "lora") and spec.use_rslora == use_dora
    assert spec.r == 4 and spec.alpha == 8.0 and len(spec.targets) == 8
    assert adapter_modules(model)["model.layers.1.self_attn.k_proj"].r == 2
    assert adapter_modules(model)["model.layers.1.self_attn.v_proj"].alpha == 3.0
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), **TOL)
    # and back: wda writes the per-module r/alpha as rank_pattern/alpha_pattern
    save_adapter(model, tmp_path / "again", spec)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "again")
    torch.testing.assert_close(logits(again, ids), logits(peft_model, ids), **TOL)
    merged_peft = linear_weights(peft_model.merge_and_unload())
    for name, w in linear_weights(merge_adapters(model)).items():
        torch.testing.assert_close(w, merged_peft[name], **TOL)


def test_saved_files_are_byte_identical(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    spec = WDA_SPECS["dora_magnitude_only"]
    add_adapters(model, spec)
    files = set()
    for i in range(8):  # metadata written in hash order would differ between saves
        save_adapter(model, tmp_path / str(i), spec)
        files.add(tuple((tmp_path / str(i) / f).read_bytes() for f in
                        ("adapter_config.json", "adapter_model.safetensors", "wda_spec.json")))
    assert len(files) == 1


def test_load_adapter_rejects_what_it_cannot_represent(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    spec = AdapterSpec("lora", r=2)
    add_adapters(model, spec)
    save_adapter(model, tmp_path, spec)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        load_adapter(copy.deepcopy(base_model), tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    bad = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(bad, tmp_path)

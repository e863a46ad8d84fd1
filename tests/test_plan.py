"""``circuitlab.plan``: memory from shapes alone, its agreement with TransformerLens, SAE-Lens
and the bundle, the refusals of ``load`` and ``attribute``, and the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import circuitlab
from circuitlab import attribution, loading, memory, presets, sizing
from circuitlab.cli import main
from circuitlab.presets import GiB, MODEL_SHAPES, TRANSCODER_SHAPES
from circuitlab.sizing import plan

README = Path(__file__).resolve().parent.parent / "README.md"


def test_model_shapes_match_transformer_lens():
    """Each preset's parameter count is that of the HookedTransformer its shapes build (on
    the meta device: nothing is allocated)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    for name, s in MODEL_SHAPES.items():
        cfg = HookedTransformerConfig(
            n_layers=s.n_layers, d_model=s.d_model, d_head=s.d_head, n_heads=s.n_heads,
            d_mlp=s.d_mlp, d_vocab=s.d_vocab, n_ctx=s.n_ctx, act_fn="silu",
            normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=s.d_head,
            gated_mlp=True, final_rms=True, n_key_value_heads=s.n_kv_heads,
            use_normalization_before_and_after=s.sandwich_norms, use_qk_norm=s.qk_norm,
            device="meta", init_weights=False)
        with torch.device("meta"):
            model = HookedTransformer(cfg, move_to_device=False)
        tensors = [*model.parameters(), *model.buffers()]
        assert sum(t.numel() for t in tensors if t.is_floating_point()) == s.n_params(), name
    assert memory.model_shape(model).n_params() == MODEL_SHAPES["llama-3.2-1b"].n_params()


def test_embedded_shape_matches_its_cache():
    """The gemma-3-270m row against the converted model's own config and weights (the
    cache, when it is built: it leaves out the scalar IGNORE buffers)."""
    import json

    folder = loading.embedded_cache()
    if not (folder / "tl_config.json").exists():
        pytest.skip("the embedded model's cache is not built")
    cfg = json.loads((folder / "tl_config.json").read_text())
    s = MODEL_SHAPES["gemma-3-270m"]
    assert (s.n_layers, s.d_model, s.d_mlp, s.d_vocab, s.n_heads, s.d_head, s.n_kv_heads,
            s.n_ctx) == tuple(cfg[k] for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_heads",
                                               "d_head", "n_key_value_heads", "n_ctx"))
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        n = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert n == s.n_params() - s.n_layers


def test_transcoder_shapes_match_sae_lens_directory():
    """Widths and L0s of the SAE-Lens releases against SAE-Lens' own directory (installed
    with it; no download), read the way ``load`` picks the ids."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory, checked = get_pretrained_saes_directory(), []
    for release, preset in presets.TRANSCODER_PRESETS.items():
        assert release in TRANSCODER_SHAPES
        shape, (model, sae_id) = TRANSCODER_SHAPES[release], preset
        n_layers = MODEL_SHAPES[model].n_layers
        ids = [(sae_id or loading._directory_sae_ids(release))(layer) for layer in range(n_layers)]
        entry = directory[release]
        assert set(ids) <= set(entry.saes_map), release
        l0s = [(entry.expected_l0 or {}).get(i) for i in ids]
        if all(l0s):  # the Gemma Scope releases publish L0s; mwhanna's does not
            checked.append(release)
            assert shape.l0 == pytest.approx(sum(l0s) / n_layers, abs=0.05), release
            assert all("width_16k" in i for i in ids) and shape.width == 16384
        else:
            assert shape.l0 == presets.ASSUMED_L0
    assert len(checked) == 2
    assert TRANSCODER_SHAPES["gemma-scope-2-270m-pt-transcoders-all"].skip  # "_affine"
    assert set(presets.PLAN_TRANSCODERS) == set(MODEL_SHAPES) == set(presets.MODEL_PRESETS)


def test_bundle_shape_comes_from_its_files():
    """The bundled CLT is sized from one header and its config (a write window of 6), and
    the plan's weight bytes are those of its stored tensors in float32 (8-bit scales aside)."""
    shape = sizing.transcoder_shape(presets.DEFAULT_BUNDLE["gemma-3-270m"])
    assert (shape.width, shape.skip, shape.jumprelu, shape.cross_layer, shape.window) == (
        1536, True, True, True, 6)
    assert presets.PLAN_TRANSCODERS["gemma-3-270m"] == presets.DEFAULT_BUNDLE["gemma-3-270m"]
    p = plan("gemma-3-270m", device="cpu24")
    from safetensors import safe_open

    numel = 0
    for file in (presets.BUNDLE_DIR / presets.DEFAULT_BUNDLE["gemma-3-270m"]).glob("W_*.safetensors"):
        with safe_open(file, "pt") as f:
            numel += sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys()
                         if not k.endswith("_scale"))
    assert p.transcoder_bytes == 4 * numel  # float32 on a CPU


def test_plan_shares_attributions_estimate():
    assert attribution.memory_parts is sizing.memory_parts
    p = plan("gemma-2-2b", tokens=20, max_feature_nodes=1000, device="cpu24",
             dtype=torch.bfloat16)
    s, tc = MODEL_SHAPES["gemma-2-2b"], TRANSCODER_SHAPES["gemma-scope-2b-pt-transcoders"]
    assert p.n_features == int(20 * 26 * tc.l0)
    assert p.attribution == {"cpu": memory.estimate_memory(
        p.n_features, 20, 26, 1000, 10, s.d_model, 128, torch.float32, s.copied_params(False),
        s.n_heads)}
    assert p.model_bytes == 2 * s.n_params() and p.fits  # bf16 halves the weights
    gpu = plan("gemma-2-2b", tokens=20, max_feature_nodes=1000, device="h100")
    assert sum(gpu.attribution.values()) == p.attribution["cpu"] and set(gpu.attribution) == {
        "cuda", "cpu"}
    assert gpu.dtype == torch.bfloat16 and plan("gemma-2-2b", device="cpu24").dtype == torch.float32


def test_plan_is_shapes_only(monkeypatch):
    """No hub, no weights: every download or load path fails loudly if touched."""
    def boom(*a, **k):
        raise AssertionError("plan touched the hub or loaded weights")

    monkeypatch.setattr(loading, "hf_hub_download", boom)
    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(loading.SAE, "from_pretrained", boom)
    for model in MODEL_SHAPES:
        for device in presets.DEVICE_SIZES:
            assert plan(model, device=device).on_device > 0


def test_plan_arguments_are_checked():
    for kwargs, match in [({"device": "tpu9"}, "Unknown device"), ({"dtype": "int8"}, "dtype="),
                          ({"tokens": 0}, "tokens=0"), ({"max_feature_nodes": 2.5}, "max_feature"),
                          ({"transcoders": "nope"}, "No shapes known for transcoders")]:
        with pytest.raises(circuitlab.CircuitlabError, match=match):
            plan("gemma-3-270m", **kwargs)
    with pytest.raises(circuitlab.CircuitlabError, match="No shapes known for model"):
        plan("gpt-5")
    assert plan("gemma-3-270m", transcoders=4096, device="t4").transcoders.width == 4096


def test_load_refuses_before_downloading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("load allocated or downloaded before refusing")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(loading, "load_transcoders", boom)
    monkeypatch.setattr(sizing, "free_memory", lambda device: 4 * GiB)
    with pytest.raises(circuitlab.CircuitlabError, match=r"(?s)needs about 1\d\.\d GiB.*nothing "
                       r"was downloaded.*dtype=torch\.bfloat16"):
        circuitlab.load("gemma-2-2b", transcoders="gemma-scope-2b-pt-transcoders")
    monkeypatch.setattr(sizing, "free_memory", lambda device: 2 * GiB)
    with pytest.raises(circuitlab.CircuitlabError, match="Loading gemma-3-270m"):
        circuitlab.load("gemma-3-270m")


def test_attribute_refusal_splits_device_and_host(tiny_rm, monkeypatch):
    parts = {"rows": 3 * GiB, "batch": 0, "selection": 0, "decoders": 0, "weights": 0,
             "backward": 0, "patterns": 0, "adjacency": 2 * GiB}
    assert memory.pools(parts, "cuda") == {"cuda": 3 * GiB, "cpu": 2 * GiB}
    free = {"cuda": 10 * GiB, "cpu": 2 * GiB}
    monkeypatch.setattr(memory, "free_memory", lambda d: free[torch.device(d).type])
    with pytest.raises(circuitlab.CircuitlabError, match="2.0 GiB on the host"):
        memory.check_attribution(parts, "cuda", None, "test")
    free["cpu"] = 3 * GiB
    memory.check_attribution(parts, "cuda", None, "test")  # 3 GiB of 8 on the GPU
    with pytest.raises(circuitlab.CircuitlabError, match="max_feature_nodes"):
        memory.check_attribution(parts, "cpu", None, "test")  # 5 GiB in one pool of 2.4
    with pytest.raises(circuitlab.CircuitlabError, match=r"needs about .* GiB.*max_feature_nodes"):
        circuitlab.attribute(tiny_rm, "the cat", memory_limit=1000, progress=False)


def readme_table() -> str:
    text = README.read_text()
    m = re.search(r"<!-- plan-table[^\n]*-->\n(.*?)\n<!-- /plan-table -->", text, re.S)
    assert m, "README lacks the plan-table markers"
    return m.group(1)


def test_readme_table_is_the_codes_output(capsys):
    assert readme_table() == sizing.table()
    assert main(["plan", "--table"]) == 0
    assert capsys.readouterr().out.strip() == sizing.table()
    assert "sizing.py" in README.read_text().split("## How it works", 1)[1]
    # The README's remark under the table.
    assert plan("gemma-2-2b", device="cpu24", dtype=torch.bfloat16).fits


def test_cli_plan(capsys):
    assert main(["plan", "--model", "qwen3-0.6b", "--device", "t4"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "To make it fit" in out
    assert main(["plan", "--model", "gemma-3-270m", "--device", "cpu24", "--transcoders",
                 "2048", "--dtype", "bf16"]) == 0
    assert "2,048 wide" in capsys.readouterr().out
    assert main(["plan", "--device", "tpu9"]) == 2

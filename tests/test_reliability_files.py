"""Damaged weight files, prompts where nothing fires and out-of-range edits: each ends in a
correct result or a ``CircuitlabError`` that names the file, field or value and the fix.

CLT folders (``circuitlab.clt.load``, eager and lazy), per-layer SAE-Lens folders, 8-bit
folders and ``circuitlab quantize``; attribution graphs with no active feature; intervention
values, edit tables and positions that cannot be used.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pandas as pd
import pytest
import torch
from conftest import tiny_clt, tiny_transcoders
from safetensors.torch import load_file, save_file

import circuitlab
from circuitlab import cli
from circuitlab import clt as clt_module
from circuitlab.errors import CircuitlabError
from circuitlab.interventions import scale, set_to
from circuitlab.quantize import FLOAT8_WEIGHTS, read_weights
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat on the mat."


@pytest.fixture
def folder(tiny, tmp_path):
    """A saved JumpReLU skip CLT for the tiny model."""
    return tiny_clt(tiny, seed=7).save(tmp_path / "clt")


def edit_file(file, **changes):
    """Rewrite the safetensors ``file`` with tensors replaced (a tensor) or removed (None)."""
    tensors = load_file(file)
    for name, value in changes.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, file)


def truncate(file):
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def poison(file, name, value=float("nan")):
    """Set one value of tensor ``name`` in ``file`` to ``value``."""
    tensor = load_file(file)[name].clone()
    tensor.view(-1)[3] = value
    edit_file(file, **{name: tensor})


# ---------------------------------------------------------------------- CLT folders


@pytest.mark.parametrize("name, shape", [("b_enc", (31,)), ("b_dec", (1,)), ("threshold", (32, 1)),
                                         ("W_skip", (32, 16))])
def test_clt_tensor_of_the_wrong_shape(folder, name, shape):
    edit_file(folder / "W_enc_1.safetensors", **{f"{name}_1": torch.zeros(shape)})
    with pytest.raises(CircuitlabError, match=rf"W_enc_1.safetensors holds {name}_1 of shape "
                                              rf"{re.escape(str(shape))}; expected .*Save"):
        clt_module.load(folder)


@pytest.mark.parametrize("name", ["threshold", "W_skip"])
@pytest.mark.parametrize("layer, other", [(1, 0), (0, 1)])
def test_clt_layer_lacking_what_the_others_have(folder, name, layer, other):
    edit_file(folder / f"W_enc_{layer}.safetensors", **{f"{name}_{layer}": None})
    with pytest.raises(CircuitlabError, match=rf"W_enc_{layer}.safetensors lacks {name}_{layer}, "
                                              rf"which W_enc_{other}.safetensors has"):
        clt_module.load(folder)


def test_clt_jumprelu_without_thresholds(folder):
    for s in range(3):
        edit_file(folder / f"W_enc_{s}.safetensors", **{f"threshold_{s}": None})
    with pytest.raises(CircuitlabError, match="declares activation jumprelu.*no threshold_0"):
        clt_module.load(folder)
    assert clt_module.load(folder, config={"activation": "relu"}).activation == "relu"


@pytest.mark.parametrize("lazy", [False, True])
def test_clt_decoder_file_holding_another_key(folder, lazy):
    W = load_file(folder / "W_dec_1.safetensors")["W_dec_1"]
    save_file({"W_dec_2": W}, folder / "W_dec_1.safetensors")
    with pytest.raises(CircuitlabError, match=r"W_dec_1.safetensors holds \['W_dec_2'\], not W_dec_1"):
        clt_module.load(folder, lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("file", ["W_enc_0", "W_enc_2", "W_dec_0", "W_dec_1"])
def test_clt_truncated_files(folder, file, lazy):
    truncate(folder / f"{file}.safetensors")
    with pytest.raises(CircuitlabError, match=rf"{file}.safetensors cannot be read as safetensors"
                                              ".*cut short.*again"):
        clt_module.load(folder, lazy=lazy)


def test_clt_truncated_file_through_circuitlab_load(tiny, folder):
    truncate(folder / "W_dec_2.safetensors")
    with pytest.raises(CircuitlabError, match="W_dec_2.safetensors cannot be read"):
        circuitlab.load(tiny, transcoders=folder)


@pytest.mark.parametrize("text, match", [("model_kind: [cross_layer\n  : :", "is not valid YAML"),
                                         ("- a\n- b\n", "holds a YAML list, not a mapping"),
                                         ("42\n", "holds a YAML int")])
def test_clt_config_that_is_not_a_yaml_mapping(tiny, folder, text, match):
    (folder / "config.yaml").write_text(text)
    with pytest.raises(CircuitlabError, match=f"config.yaml {match}"):
        clt_module.load(folder)
    with pytest.raises(CircuitlabError, match=f"config.yaml {match}"):
        circuitlab.load(tiny, transcoders=folder)


@pytest.mark.parametrize("file, name", [("W_enc_1", "W_enc_1"), ("W_enc_1", "b_enc_1"),
                                        ("W_enc_2", "b_dec_2"), ("W_enc_0", "threshold_0"),
                                        ("W_enc_1", "W_skip_1"), ("W_dec_1", "W_dec_1")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_clt_non_finite_weights_are_refused(folder, file, name, value):
    poison(folder / f"{file}.safetensors", name, value)
    match = rf"{file}.safetensors holds 1 non-finite values \(NaN or inf\) in {name}"
    with pytest.raises(CircuitlabError, match=match):
        clt_module.load(folder)
    if file.startswith("W_dec"):  # lazy: refused when read
        lazy = clt_module.load(folder, lazy=True)
        assert torch.isfinite(lazy.decoders(0)).all()
        with pytest.raises(CircuitlabError, match=match):
            lazy.decoders(1)


# ---------------------------------------------------------------------- lazy CLTs


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_lazy_clt_files_damaged_after_loading(tiny, folder, how):
    lazy = clt_module.load(folder, lazy=True)
    rm = ReplacementModel(tiny, lazy, name="tiny")
    tokens = rm.tokenize(PROMPT)
    rm.run(tokens)
    file = folder / "W_dec_1.safetensors"
    file.unlink() if how == "deleted" else truncate(file)
    what = "is gone" if how == "deleted" else "changed"
    with pytest.raises(CircuitlabError, match=rf"W_dec_1.safetensors {what} since this CLT was "
                                              "loaded lazily.*Load the CLT again"):
        rm.run(tokens)


def test_lazy_clt_never_mixes_encoders_and_decoders_of_two_folders(tiny, folder):
    lazy = clt_module.load(folder, lazy=True)
    old = lazy.decoders(1).clone()
    tiny_clt(tiny, seed=8).save(folder)  # the folder replaced whole (same shapes)
    with pytest.raises(CircuitlabError, match="W_dec_0.safetensors changed since"):
        lazy.decoders(0)
    fresh = clt_module.load(folder, lazy=True)
    assert not torch.equal(fresh.decoders(1), old)
    assert torch.equal(fresh.decoders(1), tiny_clt(tiny, seed=8).decoders(1))


def test_lazy_clt_change_with_the_same_size_and_time_is_caught(folder):
    lazy = clt_module.load(folder, lazy=True)
    file = folder / "W_dec_2.safetensors"
    stat = file.stat()
    W = load_file(file)["W_dec_2"]
    save_file({"W_dec_2": W + 1}, file)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(CircuitlabError, match="W_dec_2.safetensors changed since"):
        lazy.decoders(2)


# ---------------------------------------------------------------------- per-layer transcoders


def write_sae_folder(path, saes):
    for layer, sae in enumerate(saes):
        sae.save_model(path / f"layer_{layer:02d}")
    return path


def test_per_layer_transcoders_with_nan_weights_are_refused(tiny, tmp_path, capsys):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "jumprelu_skip_transcoder"))
    poison(src / "layer_01" / "sae_weights.safetensors", "W_dec")
    with pytest.raises(CircuitlabError, match=r"layer_01 holds 1 non-finite values .* in W_dec"):
        circuitlab.load(tiny, transcoders=src)
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 2
    assert "layer_01 holds 1 non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "q8").exists()


def test_circuit_tracer_per_layer_file_with_nan_weights(tiny, tmp_path):
    d, n = tiny.cfg.d_model, 16
    for layer in range(tiny.cfg.n_layers):
        save_file({"W_enc": torch.randn(n, d), "W_dec": torch.randn(n, d), "b_enc": torch.zeros(n),
                   "b_dec": torch.full((d,), float("inf") if layer == 2 else 0.0)},
                  tmp_path / f"layer_{layer}.safetensors")
    (tmp_path / "config.yaml").write_text(
        "feature_input_hook: hook_mlp_in\nfeature_output_hook: hook_mlp_out\ntranscoders:\n"
        + "".join(f"- layer_{layer}.safetensors\n" for layer in range(tiny.cfg.n_layers)))
    with pytest.raises(CircuitlabError, match="layer_2.safetensors holds 32 non-finite values .* b_dec"):
        circuitlab.load(tiny, transcoders=tmp_path)


# ---------------------------------------------------------------------- 8-bit folders, quantize


def test_quantize_refuses_a_folder_of_no_transcoder(tmp_path, capsys):
    from sae_lens import SAE

    sae = SAE.from_dict({"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": False,
                         "metadata": {"hook_name": "blocks.0.hook_resid_pre"}})
    src = write_sae_folder(tmp_path / "sae", [sae])
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 2
    assert "describes no transcoder (architecture 'standard'" in capsys.readouterr().err
    assert not (tmp_path / "q8").exists()


def test_quantize_refuses_weights_without_matrices(tiny, tmp_path, capsys):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "transcoder")[:1])
    save_file({"b_enc": torch.zeros(48)}, src / "layer_00" / "sae_weights.safetensors")
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 2
    assert "holds no transcoder: it lacks the matrices ['W_dec', 'W_enc']" in capsys.readouterr().err
    assert not (tmp_path / "q8").exists()


def test_quantize_non_safetensors_input(tiny, tmp_path, capsys):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "transcoder"))
    (src / "layer_01" / "sae_weights.safetensors").write_text("not safetensors at all")
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 2
    err = capsys.readouterr().err
    assert "layer_01/sae_weights.safetensors cannot be read as safetensors" in err
    assert not (tmp_path / "q8").exists()
    with pytest.raises(CircuitlabError, match="layer_01/sae_weights.safetensors cannot be read"):
        circuitlab.load(tiny, transcoders=src)
    assert cli.main(["quantize", str(src / "layer_00" / "sae_weights.safetensors"),
                     "--out", str(tmp_path / "q8")]) == 2
    assert "is not a folder of transcoders" in capsys.readouterr().err


def test_8bit_folder_beside_full_precision_weights_is_refused(tiny, tmp_path):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "skip_transcoder"))
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 0
    shutil.copy(src / "layer_01" / "sae_weights.safetensors", tmp_path / "q8" / "layer_01")
    manifest = json.loads((tmp_path / "q8" / "manifest.json").read_text())
    assert "layer_01/sae_weights.safetensors" not in manifest["sha256"]
    match = f"layer_01 holds both {FLOAT8_WEIGHTS} and sae_weights.safetensors"
    with pytest.raises(CircuitlabError, match=match):
        circuitlab.load(tiny, transcoders=tmp_path / "q8")
    with pytest.raises(CircuitlabError, match=match):
        read_weights(tmp_path / "q8" / "layer_01")


# ---------------------------------------------------------------------- nothing fires


def silent(transcoders):
    """``transcoders`` with encoder biases so negative that no feature fires."""
    with torch.no_grad():
        for tc in [transcoders] if isinstance(transcoders, clt_module.CrossLayerTranscoder) else transcoders:
            tc.b_enc.fill_(-1e4)
    return transcoders


@pytest.mark.parametrize("kind", ["per-layer", "clt"])
@pytest.mark.parametrize("max_feature_nodes", [None, 10])
def test_prompt_where_no_feature_fires(tiny, kind, max_feature_nodes):
    tcs = tiny_clt(tiny) if kind == "clt" else tiny_transcoders(tiny, "jumprelu_skip_transcoder")
    rm = ReplacementModel(tiny, silent(tcs), name="tiny")
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=max_feature_nodes, progress=False,
                                 dtype=torch.float32)
    P = len(graph.tokens)
    kinds = graph.nodes["kind"].value_counts().to_dict()
    assert kinds.pop("error") == 3 * P and kinds.pop("embedding") == P and kinds.pop("logit") > 0
    assert not kinds and graph.metadata["n_active_features"] == 0
    logits = torch.tensor((graph.nodes["kind"] == "logit").to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[logits], graph.inputs[logits], atol=1e-4)
    assert graph.adjacency[logits].abs().sum(1).min() > 0
    assert len(graph.prune().nodes) > 0


# ---------------------------------------------------------------------- interventions


@pytest.mark.parametrize("make, match", [
    (lambda: set_to([(0, 1)], "abc"), r"value='abc' is not a number"),
    (lambda: scale([(0, 1)], [1.0, 2.0]), r"factor=\[1.0, 2.0\] is not a number"),
    (lambda: set_to([(0, 1)], float("inf")), r"value=inf is not allowed; pass a finite number"),
    (lambda: set_to(pd.DataFrame({"layer": [0, float("nan")], "feature": [1, 2]}), 1.0),
     r"layer=nan in a row.*dropna"),
    (lambda: set_to(pd.DataFrame({"layer": [0], "feature": [1.5]}), 1.0), r"feature=1.5 in a row"),
])
def test_bad_edit_values_and_tables(make, match):
    with pytest.raises(CircuitlabError, match=match):
        make()


def test_zero_step_positions(tiny_rm):
    with pytest.raises(CircuitlabError, match=r"slice\(None, None, 0\) have step 0"):
        tiny_rm.intervene(PROMPT, set_to([(0, 1)], 1.0, pos=slice(None, None, 0)))
    with pytest.raises(CircuitlabError, match="step 0"):
        tiny_rm.intervene(PROMPT, [], pos=slice(None, None, 0))


@pytest.mark.parametrize("mode", ["free", "frozen-attention"])
def test_intervention_value_too_large(tiny_rm, mode):
    with pytest.raises(CircuitlabError, match=r"overflowed.*largest value is 1e\+30.*too large"):
        tiny_rm.intervene(PROMPT, set_to([(0, 1)], 1e30, pos=2), mode=mode)
    with pytest.raises(CircuitlabError, match="too large"):
        tiny_rm.sweep(PROMPT, [(0, 1)], [1.0, 1e30], op="set")
    res = tiny_rm.intervene(PROMPT, set_to([(0, 1)], 1e3, pos=2), mode=mode)
    assert torch.isfinite(res.logits).all()


def test_load_of_a_clt_folder_with_a_truncated_first_encoder(tmp_path):
    """circuitlab.load sizes the folder first (plan): a cut-short W_enc_0 is named there."""
    import circuitlab
    from conftest import tiny_clt, tiny_model

    clt = tiny_clt(tiny_model(), seed=7)
    clt.model_name = "google/gemma-3-270m"
    folder = clt.save(tmp_path / "clt")
    enc = folder / "W_enc_0.safetensors"
    enc.write_bytes(enc.read_bytes()[: enc.stat().st_size // 2])
    with pytest.raises(CircuitlabError, match="W_enc_0.safetensors"):
        circuitlab.load("gemma-3-270m", str(folder))


# ------------------------------------------- SAE-Lens folders, transcoder lists, caches, manifests


def edit_cfg(folder, text=None, **changes):
    """Rewrite ``folder/cfg.json``: with ``text``, or with fields of it changed."""
    file = folder / "cfg.json"
    file.write_text(text if text is not None else json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("damage, match", [
    (lambda f: edit_cfg(f, "{not json"), r"layer_01/cfg.json is not a readable JSON file"),
    (lambda f: edit_cfg(f, "[1, 2]"), r"layer_01/cfg.json describes no transcoder \(architecture None\)"),
    (lambda f: edit_cfg(f, architecture="gated_thing"),
     r"layer_01/cfg.json describes no transcoder \(architecture 'gated_thing'\).*jumprelu_skip_transcoder"),
    (lambda f: edit_cfg(f, d_sae="48"), r"layer_01/cfg.json has d_sae='48', not a positive whole"),
    (lambda f: edit_cfg(f, d_in=7), r"layer_01/sae_weights.safetensors does not fit .*layer_01/cfg.json "
                                    r"\(.*d_in=7.*size mismatch for W_enc"),
    (lambda f: edit_file(f / "sae_weights.safetensors", W_dec=torch.zeros(48, 5)),
     r"layer_01/sae_weights.safetensors does not fit .*size mismatch for W_dec.*save the layer again"),
    (lambda f: edit_file(f / "sae_weights.safetensors", b_enc=torch.zeros(47)), r"size mismatch for b_enc"),
    (lambda f: truncate(f / "sae_weights.safetensors"),
     r"layer_01/sae_weights.safetensors cannot be read as safetensors.*cut short"),
])
def test_damaged_sae_lens_layer_folder(tiny, tmp_path, damage, match):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "jumprelu_skip_transcoder"))
    damage(src / "layer_01")
    with pytest.raises(CircuitlabError, match=match):
        circuitlab.load(tiny, transcoders=src)


@pytest.mark.parametrize("items", [["a", "b", "c"], [torch.zeros(3)] * 3, [None]])
def test_list_of_things_that_are_not_transcoders(tiny, items):
    with pytest.raises(CircuitlabError, match=r"transcoders\[0\] is a \w+ .*not a transcoder: a list "
                                              r"of transcoders holds one SAE-Lens transcoder"):
        circuitlab.load(tiny, transcoders=items)


def test_gemma_scope_2_files_replaced_with_the_same_size_are_converted_again(tiny, tmp_path, monkeypatch):
    from hub_cache import gemma_scope_2_clt_params

    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "gs2"
    folder.mkdir()
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    for seed in (3, 4):
        params = gemma_scope_2_clt_params(n, d, seed=seed)
        sizes = []
        for s, p in enumerate(params):
            file = folder / f"params_layer_{s}.safetensors"
            stat = file.stat() if file.exists() else None
            save_file(p, file)
            if stat:  # the same size and time: only the checksum tells them apart
                os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
                sizes.append(stat.st_size == file.stat().st_size)
        assert all(sizes)
        clt = circuitlab.load(tiny, transcoders=folder, lazy=True).clt
        assert torch.equal(clt.W_enc[0], params[0]["w_enc"])
        assert torch.equal(clt.decoders(1), params[1]["w_dec"][:, 1:])


@pytest.mark.parametrize("manifest, fix", [
    ({"command": "circuitlab train --out X", "tokens_seen": 10},
     r"Resume the run that exported it: `circuitlab train` with the same --out .*tc.*checkpoint"),
    ({"command": "circuitlab finetune A --out X", "tokens_seen": 10, "finetune": {}},
     r"`circuitlab finetune` with the same --out"),
    ({"storage": {"source": "/src/tc", "command": "circuitlab quantize"}},
     r"circuitlab quantize /src/tc --out .*tc`"),
    ({}, "Restore it from git or retrain it"),
])
def test_corrupt_export_says_how_to_write_it_again(tiny, tmp_path, capsys, manifest, fix):
    src = write_sae_folder(tmp_path / "tc", tiny_transcoders(tiny, "transcoder"))
    listed = {"layer_00/cfg.json": "0" * 64}
    (src / "manifest.json").write_text(json.dumps({"sha256": listed, **manifest}))
    with pytest.raises(CircuitlabError, match="layer_00/cfg.json fails its checksum.*" + fix):
        circuitlab.load(tiny, transcoders=src)
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 2
    assert re.search(fix, capsys.readouterr().err)


def test_a_hub_release_while_offline(monkeypatch):
    """A transcoder preset that is not in the hub cache, with the hub unreachable: a clear
    error that says what to do, not the hub client's exception."""
    import circuitlab
    from conftest import tiny_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    with pytest.raises(CircuitlabError, match="Could not get the transcoders.*hub.*local folder"):
        circuitlab.load(tiny_model(), "gemma-scope-2b-pt-transcoders")

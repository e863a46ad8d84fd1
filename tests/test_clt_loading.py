"""Loading cross-layer transcoders through ``circuitlab.load``: circuit-tracer folders (as
``CrossLayerTranscoder.save`` writes them), circuit-tracer hub repositories and Gemma Scope 2's
CLT files (hub cache, ``HF_HUB_OFFLINE=1``), checked against hand computations from the raw
files; lazy loading, sizes for ``plan`` and the refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import CLT_KINDS, tiny_clt, tiny_model
from hub_cache import (TINY_CLT, TINY_CLT_FOLDER, TINY_CLT_RESID_MID, TINY_GEMMA_SCOPE_2,
                       TINY_GEMMA_SCOPE_2_CT, offline_hub, write_tiny_clts)
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

import circuitlab
from circuitlab import CircuitlabError, clt_sources, loading, presets, sizing
from circuitlab.clt import CrossLayerTranscoder

PROMPT = "the cat sat on the mat."
GS2 = f"{TINY_GEMMA_SCOPE_2}/{TINY_CLT_FOLDER}"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny):
    """The tiny CLT repositories in a hub cache, offline; circuitlab's cache in a temporary
    folder (Gemma Scope 2 files converted for lazy loading go there)."""
    home = tmp_path_factory.mktemp("hf_home")
    written = write_tiny_clts(home, tiny_clt(tiny, seed=5))
    with offline_hub(home), pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIRCUITLAB_CACHE", str(tmp_path_factory.mktemp("circuitlab_cache")))
        yield written


def jumprelu(pre, threshold):
    return pre * (pre > threshold)


def replacement_output(rm, tokens):
    """The MLP inputs and the replacement model's reconstruction of every MLP output
    (``mlp_out - errors``) at the positions after BOS."""
    trace = rm.run(tokens)
    return trace.mlp_in[:, 1:], (trace.mlp_out - trace.errors)[:, 1:]


def same_clt(a: CrossLayerTranscoder, b: CrossLayerTranscoder):
    assert (a.n_layers, a.d_model, a.d_sae, a.activation, a.k) == (b.n_layers, b.d_model, b.d_sae,
                                                                   b.activation, b.k)
    for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    for s in range(a.n_layers):
        assert torch.equal(a.decoders(s), b.decoders(s)), s


# ------------------------------------------------------------ circuit-tracer's layout


@pytest.mark.parametrize("kind", CLT_KINDS, ids=[f"{a}{'-skip' if s else ''}" for a, s in CLT_KINDS])
def test_save_load_round_trips_exactly(tiny, tmp_path, kind):
    clt = tiny_clt(tiny, *kind, seed=1)
    folder = clt.save(tmp_path / "clt")
    rm = circuitlab.load(tiny, transcoders=folder)
    assert rm.clt is not None and rm.transcoder_source == str(folder)
    same_clt(rm.clt, clt)
    lazy = circuitlab.load(tiny, transcoders=str(folder), lazy=True)
    assert lazy.clt.lazy_folder == folder and not list(lazy.clt.W_dec)
    same_clt(lazy.clt, clt)
    tokens = rm.tokenize(PROMPT)
    for a, b in zip(replacement_output(rm, tokens), replacement_output(lazy, tokens)):
        assert torch.equal(a, b)


def test_folder_reconstruction_is_the_raw_files(tiny, tmp_path):
    """From the files alone: a[s] = JumpReLU(x[s] W_enc_s^T + b_enc_s), and
    mlp_out[t] ~ b_dec_t + x[t] W_skip_t + sum over s <= t of a[s] W_dec_s[:, t - s]."""
    folder = tiny_clt(tiny, seed=2).save(tmp_path / "clt")
    rm = circuitlab.load(tiny, transcoders=folder)
    x, recon = replacement_output(rm, rm.tokenize(PROMPT))
    raw = [load_file(folder / f"W_enc_{s}.safetensors") | load_file(folder / f"W_dec_{s}.safetensors")
           for s in range(3)]
    acts = [jumprelu(x[s] @ r[f"W_enc_{s}"].T + r[f"b_enc_{s}"], r[f"threshold_{s}"])
            for s, r in enumerate(raw)]
    for t in range(3):
        want = raw[t][f"b_dec_{t}"] + x[t] @ raw[t][f"W_skip_{t}"]
        for s in range(t + 1):
            want = want + acts[s] @ raw[s][f"W_dec_{s}"][:, t - s]
        torch.testing.assert_close(recon[t], want, rtol=1e-5, atol=1e-5)


def test_a_clt_object_is_a_source(tiny):
    clt = tiny_clt(tiny, seed=3)
    rm = circuitlab.load(tiny, transcoders=clt)
    assert rm.clt is clt and rm.transcoder_source == "custom"


def test_bad_folders_are_clear_errors(tiny, tmp_path):
    folder = tiny_clt(tiny, seed=4).save(tmp_path / "clt")
    broken = shutil.copytree(folder, tmp_path / "no_dec")
    (broken / "W_dec_1.safetensors").unlink()
    with pytest.raises(CircuitlabError, match="W_dec_1.safetensors is missing"):
        circuitlab.load(tiny, transcoders=broken)
    wrong = shutil.copytree(folder, tmp_path / "wrong")
    save_file({"W_dec_1": torch.zeros(32, 3, 32)}, wrong / "W_dec_1.safetensors")
    with pytest.raises(CircuitlabError, match=r"W_dec_1 of shape \(32, 3, 32\); expected"):
        circuitlab.load(tiny, transcoders=wrong)
    resid = shutil.copytree(folder, tmp_path / "resid")
    config = yaml.safe_load((resid / "config.yaml").read_text())
    (resid / "config.yaml").write_text(yaml.safe_dump({**config, "feature_input_hook": "hook_resid_pre"}))
    with pytest.raises(CircuitlabError, match="reads 'hook_resid_pre'.*residual stream"):
        circuitlab.load(tiny, transcoders=resid)
    other = CrossLayerTranscoder(3, 48, 8).save(tmp_path / "other")
    with pytest.raises(CircuitlabError, match="width 48.*another model"):
        circuitlab.load(tiny, transcoders=other)


# ------------------------------------------------------------ circuit-tracer's hub repositories


def test_hub_clt_loads_like_circuit_tracer(tiny, hub):
    rm = circuitlab.load(tiny, transcoders=TINY_CLT)
    same_clt(rm.clt, hub["clt"])
    lazy = circuitlab.load(tiny, transcoders=TINY_CLT, lazy=True)
    assert str(lazy.clt.lazy_folder) == snapshot_download(TINY_CLT) and not list(lazy.clt.W_dec)
    same_clt(lazy.clt, hub["clt"])


def test_resid_mid_clt_reads_the_residual(tiny, hub):
    """circuit-tracer's CLTs read ``hook_resid_mid``: loaded, they read the residual before
    the pre-MLP norm, and their graphs are exact."""
    rm = circuitlab.load(tiny, transcoders=TINY_CLT_RESID_MID)
    assert rm.reads == "resid_mid"
    graph = circuitlab.attribute(rm, "the cat sat on the mat.", progress=False,
                                 dtype=torch.float32)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert torch.allclose(total[targets], graph.inputs[targets], atol=1e-5)


def test_unsupported_hook_is_refused_before_the_download(tiny, hub, monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("the weights were downloaded")

    source = clt_sources.resolve(TINY_CLT_RESID_MID)
    source.settings["feature_input_hook"] = "hook_resid_pre"
    monkeypatch.setattr(clt_sources, "_hub", lambda ref: source)
    monkeypatch.setattr(clt_sources, "snapshot_download", download)
    with pytest.raises(CircuitlabError, match="reads 'hook_resid_pre'.*Nothing was downloaded"):
        circuitlab.load(tiny, transcoders=TINY_CLT_RESID_MID)


def test_clt_of_another_model_is_refused_before_the_model_loads(hub, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", load_model)
    with pytest.raises(CircuitlabError, match="made for tiny, not for Qwen/Qwen3-0.6B"):
        circuitlab.load("Qwen/Qwen3-0.6B", transcoders=TINY_CLT)
    with pytest.raises(CircuitlabError, match="made for google/gemma-2-2b, not for meta-llama"):
        circuitlab.load("llama-3.2-1b", transcoders="mntss/clt-gemma-2-2b-426k")
    with pytest.raises(CircuitlabError, match="no config.yaml could be read.*Known CLTs: mntss"):
        circuitlab.load("gemma-2-2b", transcoders="mntss/clt-gemma-2-2b-426k")


# ------------------------------------------------------------ Gemma Scope 2


def check_gemma_scope_2(rm, params):
    """The CLT against the raw Gemma Scope 2 tensors: encoders, thresholds, skip (applied as
    x @ affine_skip_connection), and per source layer s the decoders into layers t >= s,
    w_dec[:, t], kept apart (not summed)."""
    clt = rm.clt
    assert (clt.hook_in, clt.hook_out, clt.activation) == ("hook_mlp_in", "hook_mlp_out", "jumprelu")
    for s, p in enumerate(params):
        assert torch.equal(clt.W_enc[s], p["w_enc"]) and torch.equal(clt.threshold[s], p["threshold"])
        assert torch.equal(clt.W_skip[s], p["affine_skip_connection"].T)
        assert torch.equal(clt.decoders(s), p["w_dec"][:, s:])
    writes = rm.decoders(0)[0]  # feature 0 of layer 0 into layers 0, 1 and 2
    assert writes.shape == (3, 32) and not torch.allclose(writes[0], writes[1])
    assert not torch.allclose(writes[1], writes[2]) and torch.equal(writes, params[0]["w_dec"][0])
    x, recon = replacement_output(rm, rm.tokenize(PROMPT))
    acts = [jumprelu(x[s] @ p["w_enc"] + p["b_enc"], p["threshold"]) for s, p in enumerate(params)]
    for t in range(3):
        want = params[t]["b_dec"] + x[t] @ params[t]["affine_skip_connection"]
        for s in range(t + 1):
            want = want + acts[s] @ params[s]["w_dec"][:, t]
        torch.testing.assert_close(recon[t], want, rtol=1e-5, atol=1e-5)
    summed = sum(acts[s] @ params[s]["w_dec"].sum(1) for s in range(3))  # what SAE-Lens loads
    assert not torch.allclose(recon[2] - params[2]["b_dec"] - x[2] @ params[2]["affine_skip_connection"],
                              summed, atol=1e-3)


def test_gemma_scope_2_clt_from_the_hub(tiny, hub):
    rm = circuitlab.load(tiny, transcoders=GS2)
    check_gemma_scope_2(rm, hub["gemma-scope-2"])
    lazy = circuitlab.load(tiny, transcoders=GS2, lazy=True)
    check_gemma_scope_2(lazy, hub["gemma-scope-2"])
    assert not list(lazy.clt.W_dec) and str(lazy.clt.lazy_folder).startswith(
        str(clt_sources.cache_dir()))
    tokens = rm.tokenize(PROMPT)
    for a, b in zip(replacement_output(rm, tokens), replacement_output(lazy, tokens)):
        assert torch.equal(a, b)


def test_gemma_scope_2_clt_through_a_circuit_tracer_config(tiny, hub):
    rm = circuitlab.load(tiny, transcoders=f"{TINY_GEMMA_SCOPE_2_CT}/{TINY_CLT_FOLDER}")
    check_gemma_scope_2(rm, hub["gemma-scope-2"])
    assert rm.clt.model_name == "google/gemma-3-tiny"


def test_gemma_scope_2_local_folder_and_its_errors(tiny, hub, tmp_path):
    folder = shutil.copytree(snapshot_download(TINY_GEMMA_SCOPE_2) + f"/{TINY_CLT_FOLDER}",
                             tmp_path / "gs2")
    check_gemma_scope_2(circuitlab.load(tiny, transcoders=folder), hub["gemma-scope-2"])
    shape = sizing.transcoder_shape(folder)
    assert (shape.width, shape.skip, shape.jumprelu, shape.cross_layer) == (16, True, True, True)
    p = {**hub["gemma-scope-2"][1], "w_enc": torch.zeros(32, 8)}
    (folder / "params_layer_1.safetensors").unlink()
    save_file(p, folder / "params_layer_1.safetensors")
    with pytest.raises(CircuitlabError, match="params_layer_1.safetensors holds"):
        circuitlab.load(tiny, transcoders=folder)
    (folder / "params_layer_1.safetensors").unlink()
    with pytest.raises(CircuitlabError, match=r"for layers \[0, 2\]"):
        circuitlab.load(tiny, transcoders=folder)


# ------------------------------------------------------------ plan


def test_clt_sizes(tiny, tmp_path):
    """A CLT folder's shape from its headers, and its parameter count: L encoders,
    L (L + 1) / 2 decoders (none in memory when lazy)."""
    clt = tiny_clt(tiny, seed=6)
    for shape in (sizing.transcoder_shape(clt), sizing.transcoder_shape(clt.save(tmp_path / "c"))):
        assert (shape.width, shape.skip, shape.jumprelu, shape.cross_layer) == (32, True, True, True)
    numel = sum(p.numel() for p in clt.parameters())
    assert shape.n_params(32, 3) == numel
    assert shape.n_params(32, 3, lazy=True) == numel - sum(d.numel() for d in clt.W_dec)
    windowed = tiny_clt(tiny, seed=6, window=2)  # each feature writes into 2 layers at most
    for shape in (sizing.transcoder_shape(windowed),
                  sizing.transcoder_shape(windowed.save(tmp_path / "w"))):
        assert shape.window == 2
        assert shape.n_params(32, 3) == sum(p.numel() for p in windowed.parameters()) < numel
    for name in presets.CLT_PRESETS:
        assert presets.TRANSCODER_SHAPES[name].cross_layer, name
    p = sizing.plan("llama-3.2-1b", "mntss/clt-llama-3.2-1b-524k", device="h100")
    enc = 32768 * 2048 + 2 * 32768 + 2048
    assert p.transcoder_bytes == 2 * (16 * enc + 16 * 17 // 2 * 32768 * 2048)
    with pytest.raises(CircuitlabError, match="transcoders 19.0"):
        sizing.check_load("llama-3.2-1b", "mntss/clt-llama-3.2-1b-524k", "t4", torch.bfloat16)
    sizing.check_load("llama-3.2-1b", "mntss/clt-llama-3.2-1b-524k", "t4", torch.bfloat16,
                        lazy=True)

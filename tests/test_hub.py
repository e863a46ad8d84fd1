"""The hub path through the real loaders, on a Hugging Face cache written in the hub's own
on-disk layout (``tests/hub_cache.py``; fixtures ``hub_cache``, ``gemma_hub_cache`` and
``offline_hub_cache`` in ``conftest.py``), with ``HF_HUB_OFFLINE=1`` and no network.

What runs unchanged: ``huggingface_hub.hf_hub_download`` (reading ``refs/main`` and the
snapshot symlinks), transformers' ``from_pretrained`` (config, safetensors weights,
generation config, tokenizer), TransformerLens's ``from_pretrained_no_processing``,
SAE-Lens's ``SAE.from_pretrained`` with its Gemma Scope 2 (``gemma_3``), GemmaScope
(``gemma_2_transcoder``) and ``mwhanna_transcoder`` loaders, and circuitlab's ``hf://``
resolution of circuit-tracer ``config.yaml`` files.

What the fixture (``hub_cache.offline_hub``) replaces, and why:

* ``sae_lens.loading.pretrained_sae_loaders.get_safetensors_tensor_shapes`` ->
  ``hub_cache.cached_safetensors_shapes``. SAE-Lens's Gemma Scope 2 loader
  (``get_gemma_3_config_from_hf``) calls it for the shapes of ``w_enc``/``w_dec`` in
  ``params.safetensors`` (its ``d_in``, ``d_sae``, ``d_out``). It reads the safetensors
  header with two HTTP range requests (``requests.get`` on ``hf_hub_url``), bypassing the
  cache and ``HF_HUB_OFFLINE``, so it fails offline even with the file cached. The
  replacement reads the same header from the cached file (``hf_hub_download`` + safetensors).

Settings (not functions) the fixture changes: the ``HF_HOME``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` environment variables, and ``huggingface_hub.constants.HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, which huggingface_hub computes from the environment
once, at import. ``socket.socket.connect`` raises, so that any other network access fails
loudly instead of going unnoticed.

Where the real model is too big to build here, tiny random models stand in: a Gemma 2 of
GemmaScope's width (2304, which SAE-Lens's loader fixes, as it fixes 16384 features) under
its own repo id ``circuitlab-tests/tiny-gemma-2`` (TransformerLens hard-codes
gemma-2-2b's sizes for the real id, so it is loaded with transformers from the cache and
converted with TransformerLens's own Gemma 2 conversion), and a Qwen 3 written under the
real id ``Qwen/Qwen3-0.6B`` (TransformerLens loads only its official names; it reads this
one's sizes from the cached config.json), so ``circuitlab.load("qwen3-0.6b")`` takes the
real path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_cache import (GEMMA_3, GEMMA_SCOPE_2, GEMMA_SCOPE_2_RELEASE, GEMMASCOPE,
                       GEMMASCOPE_RELEASE, MWHANNA, MWHANNA_RELEASE, QWEN_3, TINY_GEMMA_2,
                       hooked_gemma_2)
from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM

import circuitlab
from circuitlab import CircuitlabError, loading

PROMPT = "the cat sat on the mat."
GEMMA_PROMPT = 'The opposite of "small" is "'

pytestmark = pytest.mark.usefixtures("offline_hub_cache")


def assert_exact(graph):
    """Every target's edges plus its constant add up to its input (float32 rounding, as in test_attribution)."""
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = (graph.adjacency.sum(1) + graph.constants)[targets]
    scale = max(1.0, float(graph.inputs[targets].abs().max()))
    torch.testing.assert_close(total, graph.inputs[targets], rtol=0, atol=2e-5 * scale)
    assert (graph.nodes["kind"] == "feature").sum() > 0
    assert graph.adjacency.abs().sum() > 0


def model_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None])[0]


# --------------------------------------------------------------------------- the cache


def test_the_cache_has_the_hubs_layout(offline_hub_cache):
    """huggingface_hub's own cache scanner reads every repo, with ``main`` and blobs."""
    hub = offline_hub_cache.home / "hub"
    info = scan_cache_dir(hub)
    assert info.warnings == []
    repos = {r.repo_id: r for r in info.repos}
    assert {TINY_GEMMA_2, GEMMASCOPE, QWEN_3, MWHANNA} <= set(repos)
    for repo in repos.values():
        (revision,) = repo.revisions
        assert set(repo.refs) == {"main"} and revision.refs == {"main"}
        assert all(f.file_path.is_symlink() and f.blob_path.parent.name == "blobs"
                   for f in revision.files)
    snapshot = Path(try_to_load_from_cache(QWEN_3, "config.json"))
    assert snapshot.parent.parent.name == "snapshots" and snapshot.is_symlink()
    assert hf_hub_download(QWEN_3, "config.json") == str(snapshot)


# ------------------------------------------------------------------- tiny: GemmaScope


def test_gemmascope_layout_loads_and_attributes_exactly(offline_hub_cache):
    """``gemma-scope-2b-pt-transcoders`` (params.npz per layer) through SAE-Lens's GemmaScope
    loader, paired with a tiny Gemma 2 of its width loaded by transformers from the cache."""
    hooked, hf_model = hooked_gemma_2()
    tokens = hooked.to_tokens(PROMPT)[0]
    with torch.no_grad():
        hf_logits = hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(model_logits(hooked, tokens), hf_logits, rtol=0, atol=1e-4)

    rm = circuitlab.load(hooked, transcoders=GEMMASCOPE_RELEASE)
    assert rm.transcoder_source == GEMMASCOPE_RELEASE
    for layer, (tc, p) in enumerate(zip(rm.transcoders, offline_hub_cache.params["gemmascope"])):
        assert type(tc).__name__ == "JumpReLUTranscoder"
        assert tc.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            assert torch.equal(getattr(tc, name).detach(), torch.from_numpy(p[name])), name
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=32, dtype=torch.float32,
                                 progress=False)
    assert_exact(graph)


# ------------------------------------------------------------- tiny: circuit-tracer


@pytest.fixture(scope="module")
def qwen_rm(offline_hub_cache):
    """``load("qwen3-0.6b")`` with the circuit-tracer ``config.yaml`` of mwhanna's repo."""
    folder = Path(hf_hub_download(MWHANNA, "config.yaml")).parent
    return circuitlab.load("qwen3-0.6b", transcoders=folder)


def test_circuit_tracer_layout_loads_through_the_hub(qwen_rm, offline_hub_cache):
    """The model comes from the cached ``Qwen/Qwen3-0.6B`` through TransformerLens; the
    transcoders from ``hf://`` URIs resolved by ``hf_hub_download``."""
    hf_model = AutoModelForCausalLM.from_pretrained(QWEN_3, dtype=torch.float32).eval()
    tokens = qwen_rm.tokenize(PROMPT)
    with torch.no_grad():
        hf_logits = hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(model_logits(qwen_rm.model, tokens), hf_logits, rtol=0, atol=1e-4)
    for layer, (tc, p) in enumerate(zip(qwen_rm.transcoders, offline_hub_cache.params["mwhanna"])):
        assert type(tc).__name__ == "Transcoder"
        assert tc.cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
        assert torch.equal(tc.W_enc, p["W_enc"].T) and torch.equal(tc.W_dec, p["W_dec"])
        assert torch.equal(tc.b_enc, p["b_enc"]) and torch.equal(tc.b_dec, p["b_dec"])


def test_circuit_tracer_layout_attributes_exactly(qwen_rm):
    graph = circuitlab.attribute(qwen_rm, PROMPT, max_feature_nodes=32, dtype=torch.float32,
                                 progress=False)
    assert_exact(graph)


def test_mwhanna_release_reads_the_same_repo(qwen_rm):
    """SAE-Lens's ``mwhanna_transcoder`` loader (wandb-config.yaml for the sizes) gives the
    transcoders circuit-tracer's config.yaml lists."""
    saes = loading.load_transcoders(MWHANNA_RELEASE, "qwen3-0.6b", qwen_rm.n_layers)
    x = torch.randn(5, qwen_rm.d_model)
    for a, b in zip(saes, qwen_rm.transcoders):
        assert type(a).__name__ == "Transcoder"
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_a_hub_model_missing_from_the_cache_is_a_clear_error():
    with pytest.raises(CircuitlabError, match="Could not load model 'llama-3.2-1b'"):
        loading.load_model("llama-3.2-1b")


# ---------------------------------------------------------- real: Gemma 3 270M (slow)


@pytest.fixture(scope="module")
def hub_gemma(gemma_hub_cache, offline_hub_cache):
    """``load("google/gemma-3-270m", transcoders="gemma-scope-2-270m-pt-transcoders-all")``,
    checked to go through ``HookedTransformer.from_pretrained_no_processing``, not the
    embedded model's cache."""
    calls = []
    original = HookedTransformer.from_pretrained_no_processing

    def spy(cls, model_name, **kwargs):
        calls.append(model_name)
        return original(model_name, **kwargs)

    def embedded(**kwargs):
        raise AssertionError("the hub id loaded the embedded model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HookedTransformer, "from_pretrained_no_processing", classmethod(spy))
        mp.setattr(loading, "_load_embedded", embedded)
        rm = circuitlab.load(GEMMA_3, transcoders=GEMMA_SCOPE_2_RELEASE)
    assert calls == [GEMMA_3]
    return rm


@pytest.mark.slow
def test_hub_gemma_3_equals_the_embedded_model(hub_gemma, gemma_hub_cache):
    """The hub weights are the embedded GGUF dequantized: same logits. The Gemma Scope 2
    transcoders (labelled ``hook_mlp_in`` by SAE-Lens) read the MLP input circuitlab
    computes, which is what their ``hf_hook_name`` names in transformers."""
    assert hub_gemma.name == GEMMA_3
    embedded = loading.load_model("gemma-3-270m")
    tokens = hub_gemma.tokenize(GEMMA_PROMPT)
    hub_logits = model_logits(hub_gemma.model, tokens)
    torch.testing.assert_close(hub_logits, model_logits(embedded, tokens), rtol=0, atol=1e-5)
    del embedded

    hf_model = AutoModelForCausalLM.from_pretrained(GEMMA_3, dtype=torch.float32).eval()
    layer = 5
    tc = hub_gemma.transcoders[layer]
    assert tc.cfg.metadata.hook_name == f"blocks.{layer}.hook_mlp_in"
    hf_name = tc.cfg.metadata.hf_hook_name
    assert hf_name == f"model.layers.{layer}.pre_feedforward_layernorm.output"
    seen = {}

    def grab(module, inputs, out):
        seen["x"] = out[0]

    handle = hf_model.get_submodule(hf_name.removesuffix(".output")).register_forward_hook(grab)
    with torch.no_grad():
        hf_logits = hf_model(tokens[None]).logits[0]
    handle.remove()
    trace = hub_gemma.run(tokens)
    torch.testing.assert_close(trace.mlp_in[layer], seen["x"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hub_logits, hf_logits, rtol=0, atol=1e-2)


@pytest.mark.slow
def test_hub_gemma_scope_2_transcoders_are_the_cached_files(hub_gemma, gemma_hub_cache):
    params = gemma_hub_cache.params["gemma-scope-2"]
    assert len(hub_gemma.transcoders) == len(params) == 18
    for layer, (tc, p) in enumerate(zip(hub_gemma.transcoders, params)):
        assert type(tc).__name__ == "JumpReLUSkipTranscoder"
        assert tc.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert torch.equal(tc.W_enc, p["w_enc"]) and torch.equal(tc.W_dec, p["w_dec"])
        assert torch.equal(tc.threshold, p["threshold"])
        assert torch.equal(tc.W_skip, p["affine_skip_connection"].T)
    assert hf_hub_download(GEMMA_SCOPE_2, "transcoder_all/layer_0_width_16k_l0_small_affine/"
                           "params.safetensors").startswith(str(gemma_hub_cache.home))


@pytest.mark.slow
def test_hub_gemma_3_attribution_is_exact(hub_gemma):
    graph = circuitlab.attribute(hub_gemma, GEMMA_PROMPT, max_feature_nodes=48,
                                 dtype=torch.float32, progress=False)
    assert graph.metadata["model"] == GEMMA_3
    assert graph.metadata["transcoders"] == GEMMA_SCOPE_2_RELEASE
    assert_exact(graph)


@pytest.mark.slow
def test_hub_gemma_3_intervention(hub_gemma):
    """Ablating a feature in free mode = removing its decoder row from the MLP output."""
    tokens = hub_gemma.tokenize(GEMMA_PROMPT)
    trace = hub_gemma.run(tokens)
    layer, pos = 6, len(tokens) - 1
    acts = hub_gemma.encode(layer, trace.mlp_in[layer], tokens)[pos]
    feature = int(acts.argmax())
    assert acts[feature] > 0
    res = hub_gemma.intervene(GEMMA_PROMPT, circuitlab.ablate((layer, pos, feature)))
    delta = -acts[feature] * hub_gemma.transcoders[layer].W_dec[feature]

    def hook(act, hook):
        act = act.clone()
        act[0, pos] += delta
        return act

    with torch.no_grad():
        expected = hub_gemma.model.run_with_hooks(
            tokens[None], fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook)])[0, -1]
    torch.testing.assert_close(res.logits, expected, rtol=0, atol=1e-3)
    assert not torch.allclose(res.logits, res.clean_logits)

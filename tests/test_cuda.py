"""The exactness, intervention and training tests on a CUDA GPU (skipped without one).

Run them with ``pytest -m cuda`` or ``scripts/gpu_check.sh``. Without a GPU, device
placement is checked by tests/test_devices.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, SMALL, tiny_model, tiny_transcoders
from test_attribution import PROMPT, check_edges_brute_force

import circuitlab
import circuitlab.precision
from circuitlab import interventions as iv
from circuitlab.interventions import MODES, ablate

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def loaded(arch="jumprelu_skip_transcoder", device="cuda", dtype=torch.float32, seed=1):
    model = tiny_model("gemma3", seed=seed)
    return circuitlab.load(model, tiny_transcoders(model, arch, seed=seed), device=device,
                           dtype=dtype)


def exact(graph, atol):
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    return (total - graph.inputs)[targets].abs().max() <= atol * graph.inputs[targets].abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_on_cuda_and_equal_to_cpu(arch):
    rm, ref = loaded(arch), loaded(arch, device="cpu")
    assert {p.device.type for p in rm.model.parameters()} == {"cuda"}
    for max_nodes in (None, 150):
        graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=max_nodes, progress=False,
                                     dtype=torch.float32)
        assert graph.adjacency.device.type == "cpu" and exact(graph, 1e-5)
    check_edges_brute_force(rm, graph)
    full = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    cpu = circuitlab.attribute(ref, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    assert list(full.nodes["node_id"]) == list(cpu.nodes["node_id"])
    assert (full.adjacency - cpu.adjacency).abs().max() < 1e-4 * cpu.adjacency.abs().max()


def test_bf16_on_cuda():
    """bfloat16 is load's default for presets on CUDA; a given model takes it when asked."""
    assert circuitlab.precision.check_dtype(None, "cuda") is torch.bfloat16
    rm = loaded("transcoder", dtype=torch.bfloat16)
    assert {p.dtype for p in rm.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for tc in rm.transcoders for p in tc.parameters()} == {torch.bfloat16}
    assert exact(circuitlab.attribute(rm, PROMPT, progress=False), 2e-2)
    assert torch.isfinite(rm.intervene(PROMPT, [], mode="constrained").logits).all()


def test_interventions_on_cuda():
    rm = loaded()
    ids = rm.tokenize(PROMPT)
    trace = rm.run(ids)
    acts = iv.dense_activations(rm, trace)
    for mode in MODES:
        out = iv.run_edited(rm, ids, {}, mode, trace, acts)
        with torch.no_grad():
            assert torch.allclose(out.logits, rm.model(ids[None])[0], atol=1e-4)
    graph = circuitlab.attribute(rm, PROMPT, progress=False, dtype=torch.float32)
    assert graph.validate(rm, n=10).summary["constrained_agreement"] > 0.999
    feats = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(3, "influence")
    for mode in MODES:
        res = rm.intervene(PROMPT, ablate(feats), mode=mode, tokens=["a"])
        assert torch.isfinite(res.logits).all()
    cpu = loaded(device="cpu")
    kw = dict(max_new_tokens=5, new_positions=True)
    assert rm.generate(PROMPT, ablate(feats), **kw) == cpu.generate(PROMPT, ablate(feats), **kw)
    rm.sweep(PROMPT, feats, [0.0, 2.0])
    assert len(rm.features_for(PROMPT, "cat")) and len(rm.features_by_output("a"))


def test_training_on_cuda(corpus, tmp_path):
    from circuitlab.loading import load_transcoders
    from circuitlab.train.trainer import train_transcoders

    model = tiny_model("gemma3").to("cuda")
    out = train_transcoders(model, corpus, tmp_path / "tc", tokens=20_000, device="cuda", **SMALL)
    tcs = load_transcoders(out, None, model.cfg.n_layers, device="cuda")
    rm = circuitlab.ReplacementModel(model, tcs)
    assert exact(circuitlab.attribute(rm, PROMPT, progress=False, dtype=torch.float32), 1e-5)

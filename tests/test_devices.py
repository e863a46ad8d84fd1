"""Devices and dtypes: ``load(device=, dtype=)``, bf16 weights through attribution and
interventions, and the engine creating every tensor on the model's device."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_transcoders
from torch.overrides import TorchFunctionMode

import circuitlab
from circuitlab.interventions import MODES, ablate
from circuitlab.precision import check_dtype, model_dtype

PROMPT = "the cat sat on the mat."
PACKAGE = Path(circuitlab.__file__).resolve().parent


def tiny_rm(dtype=None, arch="jumprelu_skip_transcoder", seed=1):
    """A fresh tiny model (``load`` casts a given model in place) loaded with ``dtype``."""
    model = tiny_model("gemma3", seed=seed)
    return circuitlab.load(model, tiny_transcoders(model, arch, seed=seed), dtype=dtype)


def weight_dtypes(rm) -> set:
    """The dtypes of the model's and the transcoders' weights (a list per layer, or a CLT)."""
    sets = [rm.clt] if rm.clt is not None else rm.transcoders
    tensors = [*rm.model.parameters(), *(p for tc in sets for p in tc.parameters())]
    return {t.dtype for t in tensors}


# ----------------------------------------------------------------------------- dtype and device


def test_default_dtype_follows_the_device():
    assert model_dtype("cuda") == model_dtype("cuda:1") == torch.bfloat16
    assert model_dtype("cpu") == torch.float32
    assert check_dtype(None, "cuda") is torch.bfloat16 and check_dtype("auto", "cpu") is torch.float32
    assert check_dtype("bf16") is check_dtype("torch.bfloat16") is torch.bfloat16
    rm = tiny_rm()  # a given model keeps its dtype (float32) and device
    assert weight_dtypes(rm) == {torch.float32} and rm.device == torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float16])
def test_load_casts_the_model_and_every_transcoder(dtype):
    rm = tiny_rm(dtype)
    want = check_dtype(dtype)
    assert weight_dtypes(rm) == {want}
    assert rm.model.cfg.dtype == want and {tc.cfg.dtype for tc in rm.transcoders} == {
        str(want).removeprefix("torch.")}


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": torch.int8}, r"dtype=torch\.int8 is not a weight dtype; use torch\.float32"),
    ({"dtype": "half-precision"}, "dtype='half-precision' is not a weight dtype"),
    ({"dtype": [torch.float32]}, "is not a weight dtype"),
    ({"device": "tpu9"}, "Unknown device 'tpu9'.*use 'cpu'"),
])
def test_bad_dtype_or_device_is_a_clear_error(kwargs, match):
    model = tiny_model("gemma3")
    with pytest.raises(circuitlab.CircuitlabError, match=match):
        circuitlab.load(model, tiny_transcoders(model, "transcoder"), **kwargs)
    with pytest.raises(circuitlab.CircuitlabError, match=match):
        circuitlab.load("gemma-3-270m", **kwargs)  # checked before anything loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(circuitlab.CircuitlabError, match="'cuda' is not available here"):
        circuitlab.load("gemma-3-270m", device="cuda")


# ----------------------------------------------------------------------------- bf16 end to end


def test_bf16_model_attributes_and_intervenes():
    """With bf16 weights the graph is built and stays exact to bf16 rounding: each target's
    edges plus constant equal its input (the forward runs in bf16, the edges in float32)."""
    rm = tiny_rm(torch.bfloat16)
    ref = tiny_rm(torch.float32)
    for max_nodes in (None, 100):
        graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=max_nodes, progress=False,
                                     dtype=torch.float32)
        targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
        total = graph.adjacency.sum(1) + graph.constants
        scale = graph.inputs[targets].abs().max()
        assert (total - graph.inputs)[targets].abs().max() < 2e-2 * scale
        assert graph.adjacency.dtype == graph.inputs.dtype == torch.float32
        assert graph.adjacency.device.type == "cpu"
    g32 = circuitlab.attribute(ref, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    g16 = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    if list(g16.nodes["node_id"]) == list(g32.nodes["node_id"]):  # same active features
        assert (g16.adjacency - g32.adjacency).abs().max() < 5e-2 * g32.adjacency.abs().max()
    # Rows in bf16 as well (the default on CPUs with bf16 units).
    circuitlab.attribute(rm, PROMPT, max_feature_nodes=50, progress=False, dtype=torch.bfloat16)

    for mode in MODES:
        clean = rm.intervene(PROMPT, [], mode=mode)
        assert (clean.logits - clean.clean_logits).abs().max() < 0.05 * clean.clean_logits.abs().max()
        feats = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(3, "activation")
        res = rm.intervene(PROMPT, ablate(feats), mode=mode, tokens=["a"])
        assert torch.isfinite(res.logits).all()
    assert isinstance(rm.generate(PROMPT, ablate(feats), max_new_tokens=3, seed=0,
                                  temperature=1.0), str)
    assert graph.validate(rm, n=5).summary["constrained_agreement"] > 0.9
    assert len(rm.features_for(PROMPT, "cat")) > 0 and len(rm.features_by_output("a")) > 0


def test_mixed_precision_model_and_transcoders():
    """A given bf16 model keeps its dtype; the transcoders take the CPU's default (float32),
    and attribution and every intervention mode run across the two dtypes."""
    model = tiny_model("gemma3", seed=1).to(torch.bfloat16, print_details=False)
    rm = circuitlab.load(model, tiny_transcoders(model, "jumprelu_skip_transcoder", seed=1))
    assert {p.dtype for p in rm.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for tc in rm.transcoders for p in tc.parameters()} == {torch.float32}
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=100, progress=False)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert (total - graph.inputs)[targets].abs().max() < 2e-2 * graph.inputs[targets].abs().max()
    feats = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(3, "activation")
    for mode in MODES:
        assert torch.isfinite(rm.intervene(PROMPT, ablate(feats), mode=mode).logits).all()


@pytest.mark.slow
def test_embedded_model_loads_in_bf16():
    rm = circuitlab.load("gemma-3-270m", dtype=torch.bfloat16)
    assert weight_dtypes(rm) == {torch.bfloat16}
    graph = circuitlab.attribute(rm, 'The opposite of "small" is "', max_feature_nodes=64,
                                 progress=False, dtype=torch.float32)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    total = graph.adjacency.sum(1) + graph.constants
    assert (total - graph.inputs)[targets].abs().max() < 2e-2 * graph.inputs[targets].abs().max()


# ----------------------------------------------------------------------------- device consistency
#
# Every tensor the engine creates must live on the model's device, or a CUDA run fails
# where two devices meet. No GPU is needed to check it: a tensor factory called without
# ``device=`` makes a CPU tensor, so the rule is that each call of a torch factory in the
# engine's modules passes ``device=``, or is marked ``# host:`` with the reason it belongs on
# the CPU (the Graph's adjacency, inputs and constants; indexes of CPU results; the graph's
# sampling). Tensors derived from others (``*_like``, ``.new_*``, ``.to``) follow their
# source. Two checks: a static scan of every factory call (all code paths), and a run of
# attribution, interventions, generation, validation and search that records every factory
# call the engine actually makes without a device (catches calls the scan cannot see by
# name). The cuda-marked tests (tests/test_cuda.py) then run the same paths on a GPU.

ENGINE = ("attribution", "interventions", "edits", "validation", "replacement", "cards",
          "search", "prune", "hooks")
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand", "randint",
             "linspace", "eye", "as_tensor"}


def factory_calls(module: str) -> list[tuple[int, int, bool]]:
    """``(first line, last line, ok)`` of each ``torch.<factory>(...)`` call in ``module``."""
    source = (PACKAGE / f"{module}.py").read_text()
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            device = any(k.arg == "device" for k in node.keywords)
            host = any("# host:" in lines[i - 1] for i in range(node.lineno, node.end_lineno + 1))
            out.append((node.lineno, node.end_lineno, device or host))
    return out


def test_engine_factories_name_their_device():
    bad = [f"circuitlab/{m}.py:{a}" for m in ENGINE for a, _, ok in factory_calls(m) if not ok]
    assert bad == [], "pass device= (the model's) or mark the line '# host: <why>'"
    hosts = sum(1 for m in ENGINE for *_, ok in factory_calls(m) if ok)
    assert hosts > 20  # the scan sees the calls


class _Recorder(TorchFunctionMode):
    """Records ``(module, line)`` of every factory call made from the engine without a device."""

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, int]] = set()
        self.factories = {getattr(torch, name) for name in FACTORIES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            path = Path(frame.f_code.co_filename).resolve() if frame else None
            if path and path.parent == PACKAGE and path.stem in ENGINE:
                self.calls.add((path.stem, frame.f_lineno))
        return func(*args, **kwargs)


def test_engine_runs_create_no_stray_cpu_tensor(tiny_rm):
    with _Recorder() as rec:
        graph = circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=40, progress=False)
        feats = graph.nodes[graph.nodes["kind"] == "feature"].head(2)
        for mode in MODES:
            tiny_rm.intervene(PROMPT, ablate(feats), mode=mode, tokens=["a"])
        tiny_rm.generate(PROMPT, ablate(feats), max_new_tokens=2, new_positions=True)
        tiny_rm.sweep(PROMPT, feats, [0.0, 2.0])
        graph.validate(tiny_rm, n=3)
        tiny_rm.features_for(PROMPT, "cat")
    marked = {(m, line) for m in ENGINE for a, b, ok in factory_calls(m) if ok
              for line in range(a, b + 1)}
    assert rec.calls, "the recorder sees the engine's factory calls"
    assert rec.calls <= marked, sorted(rec.calls - marked)

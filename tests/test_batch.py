"""Tracing many prompts (``trace_many``, ``circuitlab trace-batch``) on Ray and in-process,
and ``aggregate`` across prompts, on the tiny model.

Ray starts once for the module (``ray.init(num_cpus=2)``); the Ray batch runs once and its
tests read what it wrote. Workers get one CPU each, hence one torch thread: graphs traced in
this process for comparison use one thread too (the thread count changes float rounding).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from hub_cache import MWHANNA, offline_hub
from huggingface_hub import hf_hub_download

import circuitlab
from circuitlab import CircuitlabError
from circuitlab.batch import COLUMNS, SUMMARY, read_prompts
from circuitlab.cli import main
from circuitlab.comparison import compare

OPTIONS = dict(max_feature_nodes=32, dtype=torch.float32)
PROMPTS = ["the cat sat", "a dog ran", "big red house"]
KILL = "kill this worker"
FAILING = [{"id": "empty", "prompt": ""},
           {"id": "bad-target", "prompt": "the cat", "logit_targets": ["zz"]}]


@contextmanager
def threads(n: int):
    """Run with ``n`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(rm, prompt: str) -> circuitlab.Graph:
    """``attribute`` in this process."""
    return circuitlab.attribute(rm, prompt, progress=False, **OPTIONS)


def assert_same(graph, expected):
    assert torch.equal(graph.adjacency, expected.adjacency)
    pd.testing.assert_frame_equal(graph.nodes, expected.nodes, check_exact=True)


def dies_once(marker: Path):
    """An ``attribute_fn`` whose worker process exits on the prompt ``KILL`` the first time
    (the marker file records that it did, and the process id)."""

    def attribute_fn(rm, prompt, **options):
        if prompt == KILL and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)
        return circuitlab.attribute(rm, prompt, **options)

    return attribute_fn


def counting(calls: list, fail=lambda prompt, n: None):
    """An ``attribute_fn`` that appends each prompt to ``calls`` and first calls ``fail``
    with the prompt and how often it was seen (to raise)."""

    def attribute_fn(rm, prompt, **options):
        calls.append(prompt)
        fail(prompt, calls.count(prompt))
        return circuitlab.attribute(rm, prompt, **options)

    return attribute_fn


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_batch(tiny_rm, ray_runtime, tmp_path_factory):
    """One Ray batch of 2 workers: three prompts, two that fail and one whose worker dies
    the first time; full and pruned graphs saved."""
    out = tmp_path_factory.mktemp("batch") / "out"
    marker = out.parent / "killed"
    prompts = PROMPTS + FAILING + [{"id": "kill", "prompt": KILL}]
    summary = circuitlab.trace_many(prompts, tiny_rm, out=out, engine="ray", workers=2,
                                    save="both", attribute_fn=dies_once(marker), progress=False,
                                    **OPTIONS)
    return out, summary, marker


def test_ray_graphs_equal_attribute_in_process(ray_batch, tiny_rm):
    out, summary, _ = ray_batch
    assert list(summary.columns) == COLUMNS
    pd.testing.assert_frame_equal(pd.read_parquet(out / SUMMARY).set_index("id").loc[summary.id],
                                  summary.set_index("id"), check_dtype=False)
    ok = summary[summary.status == "ok"].set_index("prompt")
    for prompt in PROMPTS + [KILL]:
        with threads(1):
            expected = reference(tiny_rm, prompt)
            pruned = expected.prune()
            scores = pruned.scores()
        pid = ok.loc[prompt, "id"]
        assert_same(circuitlab.Graph.load(out / pid / "graph"), expected)
        assert_same(circuitlab.Graph.load(out / pid / "pruned"), pruned)
        row = ok.loc[prompt]
        logits = expected.nodes[expected.nodes.kind == "logit"]
        assert row.targets == logits.token.tolist() and row.probs == logits.prob.tolist()
        assert (row.nodes, row.edges, row.nodes_pruned, row.edges_pruned) == (
            len(expected.nodes), expected.n_edges, len(pruned.nodes), pruned.n_edges)
        assert (row.replacement_pruned, row.completeness_pruned) == (
            scores["replacement"], scores["completeness"])
        top = expected.nodes[expected.nodes.kind == "feature"].nlargest(5, "influence")
        assert row.top_nodes == top.node_id.tolist()
        assert row.top_features == [f"L{l}/F{f}" for l, f in zip(top.layer, top.feature)]
    assert summary.worker.nunique() >= 2  # both workers took prompts


def test_ray_failures_are_recorded_and_the_rest_completes(ray_batch):
    out, summary, _ = ray_batch
    rows = summary.set_index("id")
    assert rows.loc["empty", "status"] == "failed" and "empty" in rows.loc["empty", "error"]
    assert "not a single token" in rows.loc["bad-target", "error"]
    # a CircuitlabError fails the same way every time: no retry
    assert rows.loc[["empty", "bad-target"], "attempts"].tolist() == [1, 1]
    assert not (out / "empty").exists() and not (out / "bad-target").exists()
    assert (summary.status == "ok").sum() == len(PROMPTS) + 1


def test_a_worker_that_dies_is_replaced_and_its_prompt_traced(ray_batch):
    out, summary, marker = ray_batch
    killed = int(marker.read_text())  # the worker did die
    row = summary.set_index("id").loc["kill"]
    assert row.status == "ok" and row.attempts == 2
    assert int(row.worker.rsplit(":", 1)[1]) != killed


def test_a_rerun_traces_only_what_is_not_done(ray_batch, tiny_rm):
    out, summary, _ = ray_batch
    calls = []
    prompts = PROMPTS + FAILING + [{"id": "kill", "prompt": KILL}, "a new prompt"]
    again = circuitlab.trace_many(prompts, tiny_rm, out=out, engine="local", save="both",
                                  attribute_fn=counting(calls), progress=False, **OPTIONS)
    assert sorted(calls) == sorted(["", "the cat", "a new prompt"])  # the failed ones and the new one
    done = summary[summary.status == "ok"].set_index("id")
    assert again.set_index("id").loc[done.index, "finished"].equals(done.finished)
    assert (again.status == "ok").sum() == len(done) + 1
    assert len(pd.read_parquet(out / SUMMARY)) == len(prompts)


def test_an_id_reused_for_another_prompt_is_refused(ray_batch, tiny_rm):
    out, summary, _ = ray_batch
    pid = summary.id[0]
    with pytest.raises(CircuitlabError, match="another prompt"):
        circuitlab.trace_many([{"id": pid, "prompt": "something else"}], tiny_rm, out=out,
                              engine="local")


def test_an_unreachable_address_is_a_clear_error(tmp_path, tiny_rm):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CircuitlabError, match=rf"127\.0\.0\.1:{port}.*ray start --head"):
        circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path, address=f"127.0.0.1:{port}")
    with pytest.raises(CircuitlabError, match="HOST:PORT"):
        circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path, address="nowhere")


def test_missing_ray_is_a_clear_error(tmp_path, tiny_rm, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(CircuitlabError, match=r'pip install "circuitlab\[ray\]"'):
        circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path)


# ----------------------------------------------------------------------------- local engine


def test_local_engine_in_memory_gives_the_same_graphs(tiny_rm):
    result = circuitlab.trace_many(PROMPTS, tiny_rm, engine="local", save="both", progress=False,
                                   **OPTIONS)
    assert list(result.summary.status) == ["ok"] * 3
    for pid, prompt in zip(result.summary.id, PROMPTS):
        expected = reference(tiny_rm, prompt)
        assert_same(result.full[pid], expected)
        assert_same(result.pruned[pid], expected.prune())


def test_resume_after_an_interrupted_batch(tiny_rm, tmp_path):
    def interrupt(prompt, n):
        if prompt == PROMPTS[1]:
            raise KeyboardInterrupt

    calls = []
    with pytest.raises(KeyboardInterrupt):
        circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path, engine="local", progress=False,
                              attribute_fn=counting(calls, interrupt), **OPTIONS)
    first = pd.read_parquet(tmp_path / SUMMARY)
    assert first.prompt.tolist() == PROMPTS[:1] and first.status.tolist() == ["ok"]
    calls.clear()
    summary = circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path, engine="local",
                                    progress=False, attribute_fn=counting(calls), **OPTIONS)
    assert calls == PROMPTS[1:]
    assert summary.finished[0] == first.finished[0]
    assert list(summary.status) == ["ok"] * 3
    # a graph folder that went missing is traced again
    shutil.rmtree(tmp_path / summary.id[2] / "pruned")
    calls.clear()
    circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path, engine="local", progress=False,
                          attribute_fn=counting(calls), **OPTIONS)
    assert calls == PROMPTS[2:]


def test_errors_other_than_circuitlab_errors_are_retried(tiny_rm, tmp_path):
    def flaky(prompt, n):
        if prompt == PROMPTS[0] and n == 1 or prompt == PROMPTS[1]:
            raise RuntimeError(f"flaky {n}")

    calls = []
    summary = circuitlab.trace_many(PROMPTS[:2], tiny_rm, out=tmp_path, engine="local",
                                    retries=2, progress=False,
                                    attribute_fn=counting(calls, flaky), **OPTIONS)
    rows = summary.set_index("prompt")
    assert rows.loc[PROMPTS[0], "status"] == "ok" and rows.loc[PROMPTS[0], "attempts"] == 2
    assert rows.loc[PROMPTS[1], "status"] == "failed" and rows.loc[PROMPTS[1], "attempts"] == 3
    assert rows.loc[PROMPTS[1], "error"] == "RuntimeError: flaky 3"


# ----------------------------------------------------------------------------- arguments and files


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b'The opposite of "small" is "\r\n\n   \nend with spaces  \n')
    assert read_prompts(txt) == [{"prompt": 'The opposite of "small" is "'},
                                 {"prompt": "end with spaces  "}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b ", "id": "x", "logit_targets": [3]}\n\n{"prompt": "c"}\n')
    assert read_prompts(jsonl) == [{"prompt": "a b ", "id": "x", "logit_targets": [3]},
                                   {"prompt": "c"}]
    jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(CircuitlabError, match=r"p\.jsonl:2 must be an object"):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "a"\n')
    with pytest.raises(CircuitlabError, match=r"p\.jsonl:1 is not valid JSON"):
        read_prompts(jsonl)
    with pytest.raises(CircuitlabError, match=r"\.txt file"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(CircuitlabError, match="Cannot read"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts="one prompt"), "list of strings"),
    (dict(prompts=["a", "a"]), "Duplicate prompt ids"),
    (dict(prompts=[{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}]), r"Duplicate prompt ids \['x'\]"),
    (dict(prompts=[{"id": "../x", "prompt": "a"}]), "cannot name a folder"),
    (dict(prompts=[{"prompt": "a", "targets": []}]), "Unknown keys"),
    (dict(save="some"), "save='some'"),
    (dict(engine="dask"), "engine='dask'"),
    (dict(retries=-1), "retries=-1"),
    (dict(engine="local", workers=2), "apply to engine='ray'"),
    (dict(out=None), "pass out="),
])
def test_bad_arguments_are_clear_errors(kwargs, message, tiny_rm, tmp_path):
    args = dict(prompts=PROMPTS, out=tmp_path, engine="ray") | kwargs
    with pytest.raises(CircuitlabError, match=message):
        circuitlab.trace_many(args.pop("prompts"), tiny_rm, **args)


def test_out_that_is_a_file_is_refused(tiny_rm, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CircuitlabError, match="is a file"):
        circuitlab.trace_many(PROMPTS, tiny_rm, out=tmp_path / "file", engine="local")
    assert (tmp_path / "file").read_text() == "mine"


def test_default_ids_are_stable_and_tell_prompts_apart(tiny_rm):
    result = circuitlab.trace_many(["the cat", "the cat "], tiny_rm, engine="local",
                                   progress=False, **OPTIONS)
    first, second = result.summary.id
    assert first.startswith("the-cat-") and second.startswith("the-cat-") and first != second
    again = circuitlab.trace_many(["the cat"], tiny_rm, engine="local", progress=False, **OPTIONS)
    assert again.summary.id[0] == first


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def tiny_hub(hub_cache):
    """The hub cache's tiny Qwen 3 and its circuit-tracer transcoders, for the CLI."""
    with offline_hub(hub_cache.home):
        yield str(Path(hf_hub_download(MWHANNA, "config.yaml")).parent)


def test_cli_trace_batch_txt_and_jsonl(tiny_hub, tmp_path, capsys):
    txt = tmp_path / "prompts.txt"
    txt.write_text('the cat "sat" \n\nthe dog ran\n')
    base = ["--engine", "local", "--model", "qwen3-0.6b", "--transcoders", tiny_hub,
            "--max-feature-nodes", "16"]
    assert main(["trace-batch", str(txt), "--out", str(tmp_path / "a")] + base) == 0
    text = capsys.readouterr().out
    assert "Prompts traced: 2 in" in text and "failed: 0." in text
    summary = pd.read_parquet(tmp_path / "a" / SUMMARY)
    assert summary.prompt.tolist() == ['the cat "sat" ', "the dog ran"]
    assert all((tmp_path / "a" / pid / "pruned" / "graph.json").is_file() for pid in summary.id)

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"id": "cat", "prompt": "the cat", "logit_targets": [5]}) + "\n"
                     + json.dumps({"id": "bad", "prompt": " "}) + "\n")
    assert main(["trace-batch", str(jsonl), "--out", str(tmp_path / "b"), "--save", "full"]
                + base) == 0
    text = capsys.readouterr().out
    assert "failed: 1." in text and "failed bad: CircuitlabError" in text
    graph = circuitlab.Graph.load(tmp_path / "b" / "cat" / "graph")
    assert graph.nodes[graph.nodes.kind == "logit"].feature.tolist() == [5]
    assert main(["trace-batch", str(jsonl), "--out", str(tmp_path / "b"), "--save", "full"]
                + base) == 0
    assert "Prompts traced: 1 in" in capsys.readouterr().out  # only the failed one again


def test_cli_trace_batch_errors(tmp_path, capsys):
    assert main(["trace-batch", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    assert "Cannot read the prompts" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a\n")
    assert main(["trace-batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                 "--engine", "local", "--workers", "2"]) == 2
    assert "apply to engine='ray'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace-batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--address", "--workers", "--gpus-per-worker", "--engine", "--save",
                   "--max-feature-nodes", "--model", "--transcoders"):
        assert option in text


@pytest.mark.slow
def test_cli_trace_batch_on_the_embedded_model(tmp_path, capsys):
    txt = tmp_path / "prompts.txt"
    txt.write_text('The opposite of "small" is "\nThe capital of France is\n')
    assert main(["trace-batch", str(txt), "--out", str(tmp_path / "out"), "--engine", "local",
                 "--max-feature-nodes", "64"]) == 0
    assert "Prompts traced: 2 in" in capsys.readouterr().out
    summary = pd.read_parquet(tmp_path / "out" / SUMMARY)
    assert summary.status.tolist() == ["ok", "ok"]
    assert summary.targets[0][0] == "large"


# ----------------------------------------------------------------------------- aggregate


@pytest.fixture(scope="module")
def graphs(tiny_rm):
    """Pruned tiny-model graphs of four prompts, some with labels and supernodes."""
    prompts = PROMPTS + ["the cat ran"]
    graphs = {f"p{i}": reference(tiny_rm, p).prune() for i, p in enumerate(prompts)}
    for i, g in enumerate(graphs.values()):
        feats = g.nodes[g.nodes.kind == "feature"].nlargest(3, "influence").node_id.tolist()
        g.labels = {feats[0]: "my label"} if i < 2 else {}
        g.supernodes = {"group": feats[:2]} if i != 1 else {"other": feats[1:]}
    return graphs


def test_aggregate_against_a_brute_force_recount(graphs):
    agg = circuitlab.aggregate(graphs)
    per = {}  # (layer, feature) -> {prompt id: (summed influence, max activation)}
    for pid, g in graphs.items():
        for r in g.nodes[g.nodes.kind == "feature"].itertuples():
            inf, act = per.setdefault((r.layer, r.feature), {}).get(pid, (0.0, -float("inf")))
            per[(r.layer, r.feature)][pid] = (inf + r.influence, max(act, r.activation))
    features = agg.features.set_index(["layer", "feature"])
    assert set(features.index) == set(per)
    for key, found in per.items():
        row = features.loc[key]
        assert row["count"] == len(found) and row["share"] == len(found) / len(graphs)
        assert row.mean_influence == pytest.approx(sum(v[0] for v in found.values()) / len(found))
        assert row.max_influence == pytest.approx(max(v[0] for v in found.values()))
        assert row.mean_activation == pytest.approx(sum(v[1] for v in found.values()) / len(found))
    assert list(agg.features["count"]) == sorted(agg.features["count"], reverse=True)
    recurring = [k for k, v in per.items() if len(v) >= 2]
    assert len(agg.matrix.columns) == min(40, len(recurring)) > 0
    for key in agg.matrix.columns:
        for pid in graphs:
            assert agg.matrix.loc[pid, key] == pytest.approx(per[key].get(pid, (0.0,))[0])
    assert set(circuitlab.aggregate(graphs, top=None).matrix.columns) == set(recurring)


def test_aggregate_labels_supernodes_and_similarity(graphs):
    agg = circuitlab.aggregate(graphs)
    labelled = {tuple(g.nodes.set_index("node_id").loc[n, ["layer", "feature"]])
                for g in graphs.values() for n in g.labels}
    labels = agg.features.set_index(["layer", "feature"]).label
    assert all(labels[k] == "my label" for k in labelled)
    assert all(labels[k] == f"L{k[0]}/F{k[1]}" for k in labels.index if k not in labelled)
    assert set(circuitlab.aggregate(graphs, labels=False).features.label) == {
        f"L{l}/F{f}" for l, f in labels.index}
    supernodes = agg.supernodes.set_index("supernode")
    assert supernodes.loc["group", "count"] == 3 and supernodes.loc["other", "count"] == 1
    assert supernodes.loc["other", "prompts"] == ["p1"]
    g = graphs["p1"]
    expected = g.nodes.set_index("node_id").loc[g.supernodes["other"], "influence"].sum()
    assert supernodes.loc["other", "mean_influence"] == pytest.approx(expected)
    ids = list(graphs)
    assert agg.similarity.loc["p0", "p2"] == agg.similarity.loc["p2", "p0"] == pytest.approx(
        compare(graphs["p0"], graphs["p2"]).overlap)
    assert list(agg.similarity.index) == ids and agg.similarity.loc["p1", "p1"] == pytest.approx(1)
    fig = agg.figure()
    assert fig.data[0].z.shape == agg.matrix.shape
    assert any("my label" in x for x in fig.data[0].x)
    assert agg.figure("similarity").data[0].z.shape == (4, 4)
    with pytest.raises(CircuitlabError, match="what="):
        agg.figure("nodes")


def test_aggregate_reads_a_batch_folder(ray_batch):
    out, _, _ = ray_batch
    summary = pd.read_parquet(out / SUMMARY)
    ok = summary[summary.status == "ok"]
    from_folder = circuitlab.aggregate(out)
    loaded = {pid: circuitlab.Graph.load(out / pid / "pruned") for pid in ok.id}
    pd.testing.assert_frame_equal(from_folder.features, circuitlab.aggregate(loaded).features)
    assert list(from_folder.similarity.index) == ok.id.tolist()
    assert from_folder.supernodes.empty


def test_aggregate_errors(tmp_path):
    with pytest.raises(CircuitlabError, match="no graphs"):
        circuitlab.aggregate({})
    with pytest.raises(CircuitlabError, match="no graphs"):
        circuitlab.aggregate(tmp_path)
    with pytest.raises(CircuitlabError, match="dict"):
        circuitlab.aggregate(42)


def test_importing_aggregation_does_not_load_plotly():
    code = "import sys, circuitlab.aggregation; assert 'plotly' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Reliability of many-prompt work: two batches into one ``out``, a Ray address that
accepts connections but is not Ray, and ``aggregate`` over mixed or missing graphs.

Every case failed (lost rows, a hang, a silent mix-up) before its fix.
"""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_model, tiny_transcoders

import circuitlab
from circuitlab import CircuitlabError
from circuitlab.batch import SUMMARY
from circuitlab.cli import main
from circuitlab.ray_engine import check_reachable
from circuitlab.replacement import ReplacementModel

OPTIONS = dict(max_feature_nodes=16, dtype=torch.float32)
FIRST = ["the cat sat", "a dog ran"]
SECOND = ["big red house", "the cat ran"]
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from circuitlab.batch import locked

    with locked(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
""")


def trace(prompts, rm, out, **kwargs):
    """``trace_many`` in this process, quietly."""
    return circuitlab.trace_many(prompts, rm, out=out, engine="local", progress=False,
                                 **OPTIONS, **kwargs)


# ----------------------------------------------------------------------------- one out, two batches


def intruding(out: Path, refusals: list):
    """An ``attribute_fn`` that, before each prompt, starts a second batch of ``SECOND``
    into ``out`` and appends its ``CircuitlabError`` to ``refusals``."""

    def attribute_fn(rm, prompt, **options):
        try:
            trace(SECOND, rm, out)
        except CircuitlabError as err:
            refusals.append(str(err))
        return circuitlab.attribute(rm, prompt, **options)

    return attribute_fn


def test_a_second_batch_into_a_busy_out_is_refused_and_nothing_is_lost(tiny_rm, tmp_path):
    refusals = []
    summary = trace(FIRST, tiny_rm, tmp_path, attribute_fn=intruding(tmp_path, refusals))
    assert len(refusals) == len(FIRST)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    assert all(f"Another trace-batch is writing into {tmp_path} (process {holder}" in r
               and "--out" in r for r in refusals)
    written = pd.read_parquet(tmp_path / SUMMARY)
    assert written.prompt.tolist() == FIRST and list(summary.status) == ["ok"] * len(FIRST)
    assert all((tmp_path / pid / "pruned" / "graph.json").is_file() for pid in summary.id)


def test_the_lock_names_its_holder_and_dies_with_it(tiny_rm, tmp_path, capsys):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        (tmp_path / "p.txt").write_text("\n".join(SECOND) + "\n")
        assert main(["trace-batch", str(tmp_path / "p.txt"), "--out", str(out),
                     "--engine", "local"]) == 2
        error = capsys.readouterr().err
        assert f"Another trace-batch is writing into {out}" in error
        assert f":{proc.pid}" in error and "wait for it to finish" in error
    finally:
        proc.kill()  # a SIGKILL: the process cannot release anything itself
        proc.wait()
    summary = trace(SECOND, tiny_rm, out)
    assert list(summary.status) == ["ok"] * len(SECOND)


def test_a_second_batch_after_the_first_keeps_its_rows(tiny_rm, tmp_path):
    first = trace(FIRST, tiny_rm, tmp_path)
    trace(SECOND, tiny_rm, tmp_path)
    written = pd.read_parquet(tmp_path / SUMMARY).set_index("id")
    assert sorted(written.prompt) == sorted(FIRST + SECOND)
    assert (written.status == "ok").all()
    assert written.loc[first.id, "finished"].tolist() == first.finished.tolist()
    assert list(circuitlab.aggregate(tmp_path).similarity.index) == written.index.tolist()


# ----------------------------------------------------------------------------- a Ray address that is not Ray


@contextmanager
def silent_listener():
    """The port of a loopback server that accepts connections and never answers."""
    held = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def accept():
            try:
                while True:
                    held.append(server.accept()[0])
            except OSError:  # the server socket was closed
                pass

        threading.Thread(target=accept, daemon=True).start()
        try:
            yield server.getsockname()[1]
        finally:
            server.shutdown(socket.SHUT_RDWR)
            for conn in held:
                conn.close()


class Hello(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a greeting."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@contextmanager
def http_server():
    """The port of a loopback HTTP server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("listener", [silent_listener, http_server])
def test_an_address_that_is_not_ray_fails_fast(listener, tmp_path):
    (tmp_path / "p.txt").write_text("the cat sat\n")
    with listener() as port:
        command = [sys.executable, "-m", "circuitlab", "trace-batch", str(tmp_path / "p.txt"),
                   "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    error = " ".join(done.stderr.split())
    assert f"127.0.0.1:{port} accepts connections but does not answer as a Ray cluster" in error
    assert "ray start --head" in error


def test_a_ray_cluster_passes_the_check():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        check_reachable(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- aggregate


@pytest.fixture(scope="module")
def mixed(tiny_rm):
    """Pruned graphs of three model and transcoder sets: the tiny model's, the same model
    with other transcoders, and another model."""
    tiny = tiny_rm.model
    others = ReplacementModel(tiny, tiny_transcoders(tiny, "jumprelu_skip_transcoder", seed=1),
                              name="tiny", transcoder_source="seed-1")
    gpt2 = tiny_model("gpt2")
    other_model = ReplacementModel(gpt2, tiny_transcoders(gpt2, "jumprelu_skip_transcoder"),
                                   name="tiny-gpt2")
    rms = {"a": tiny_rm, "b": tiny_rm, "c": others, "d": others, "e": other_model}
    prompts = dict(zip(rms, FIRST + SECOND + ["a red cat"]))
    return {pid: circuitlab.attribute(rm, prompts[pid], progress=False, **OPTIONS).prune()
            for pid, rm in rms.items()}


def test_aggregate_refuses_graphs_of_different_transcoders(mixed):
    with pytest.raises(CircuitlabError) as caught:
        circuitlab.aggregate(mixed)
    message = str(caught.value)
    for part in ("model 'tiny' with transcoders None (a, b)",
                 "model 'tiny' with transcoders 'seed-1' (c, d)",
                 "model 'tiny-gpt2' with transcoders None (e)", "separate=True"):
        assert part in message
    with pytest.raises(CircuitlabError, match="different models or transcoders"):
        circuitlab.aggregate([mixed["a"], mixed["c"]])


def test_aggregate_separate_gives_one_aggregate_per_set(mixed):
    groups = circuitlab.aggregate(mixed, separate=True)
    expected = {("tiny", None): ["a", "b"], ("tiny", "seed-1"): ["c", "d"],
                ("tiny-gpt2", None): ["e"]}
    assert list(groups) == list(expected)
    for key, ids in expected.items():
        alone = circuitlab.aggregate({pid: mixed[pid] for pid in ids})
        assert list(groups[key].similarity.index) == ids
        pd.testing.assert_frame_equal(groups[key].features, alone.features)


def test_aggregate_reports_prompts_whose_graph_is_gone_or_damaged(tiny_rm, tmp_path):
    summary = trace(FIRST + SECOND, tiny_rm, tmp_path)
    gone, damaged, *kept = summary.id
    shutil.rmtree(tmp_path / gone)
    (tmp_path / damaged / "pruned" / "graph.json").write_text("{")
    with pytest.warns(UserWarning, match=rf"2 traced prompts of {tmp_path} have no readable "
                                         rf"graph and are left out: {gone}, {damaged}"):
        agg = circuitlab.aggregate(tmp_path)
    assert list(agg.similarity.index) == kept
    assert list(agg.missing) == [gone, damaged]
    assert "holds no pruned/ or graph/ folder" in agg.missing[gone]
    assert "graph.json" in agg.missing[damaged]
    assert "2 missing" in repr(agg)
    assert circuitlab.aggregate({pid: circuitlab.Graph.load(tmp_path / pid / "pruned")
                                 for pid in kept}).missing == {}

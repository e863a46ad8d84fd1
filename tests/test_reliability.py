"""Bad input gets a clear ``CircuitlabError``; nothing a user wrote is lost.

The catalogue of the README's reliability section, case by case; a seeded fuzz test over
prompts, ``attribute`` arguments, intervention specs and damaged graph files; and kill
tests that SIGKILL a process while it saves graphs, labels, cards and checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import circuitlab
from circuitlab import Graph
from circuitlab.errors import CircuitlabError
from circuitlab.files import verify_manifest
from circuitlab.interventions import ablate, set_to

PROMPT = "the cat sat on the mat."
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def graph(tiny_rm):
    return circuitlab.attribute(tiny_rm, PROMPT, max_feature_nodes=None, progress=False)


# ---------------------------------------------------------------------- saving never deletes


def test_save_refuses_a_folder_of_user_files(graph, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CircuitlabError, match="will not replace them"):
        graph.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_dot_is_refused_not_a_traceback(graph, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CircuitlabError, match="holds files but no saved graph"):
        graph.save(".")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_over_a_graph_keeps_files_beside_it_and_the_umask(graph, tmp_path):
    folder = tmp_path / "g"
    old = os.umask(0o022)
    try:
        graph.save(folder)
        (folder / "notes.txt").write_text("mine")
        (folder / "figures").mkdir()
        (folder / "figures" / "a.png").write_bytes(b"png")
        graph.save(folder)
    finally:
        os.umask(old)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "figures" / "a.png").read_bytes() == b"png"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "graph.json").stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left"


def test_save_to_a_file_is_refused(graph, tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(CircuitlabError, match="is a file"):
        graph.save(tmp_path / "f")


# ---------------------------------------------------------------------- attribute arguments


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": -3}, "batch_size=-3"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"max_feature_nodes": -1}, "max_feature_nodes=-1"),
    ({"max_feature_nodes": 2.5}, "max_feature_nodes=2.5"),
    ({"logit_targets": " large"}, "must be a list"),
    ({"logit_targets": []}, "names no target"),
    ({"max_logits": 0}, "max_logits=0"),
    ({"logit_targets": [torch.full((32,), float("nan"))]}, "NaN"),
    ({"dtype": torch.int32}, "dtype"),
    ({"memory_limit": 0}, "memory_limit=0"),
    ({"logit_prob": float("nan")}, "logit_prob=nan"),
    ({"logit_prob": 0.0}, "logit_prob=0.0"),
])
def test_attribute_bad_arguments(tiny_rm, kwargs, match):
    with pytest.raises(CircuitlabError, match=match):
        circuitlab.attribute(tiny_rm, PROMPT, progress=False, **kwargs)


@pytest.mark.parametrize("prompt, match", [
    ("a \ud800 b", "not valid Unicode"), ("", "empty"), ("   ", "empty"), (42, "empty")])
def test_bad_prompts(tiny_rm, prompt, match):
    with pytest.raises(CircuitlabError, match=match):
        circuitlab.attribute(tiny_rm, prompt, progress=False)


def test_intervention_bad_arguments(tiny_rm):
    with pytest.raises(CircuitlabError, match="Unknown mode"):
        tiny_rm.intervene(PROMPT, [], mode="loose")
    with pytest.raises(CircuitlabError, match="max_new_tokens=0"):
        tiny_rm.generate(PROMPT, [], max_new_tokens=0)
    with pytest.raises(CircuitlabError, match="temperature=-1"):
        tiny_rm.generate(PROMPT, [], temperature=-1)
    with pytest.raises(CircuitlabError, match="values is empty"):
        tiny_rm.sweep(PROMPT, [(0, 1)], [])
    with pytest.raises(CircuitlabError, match="finite"):
        tiny_rm.intervene(PROMPT, set_to([(0, 1)], float("nan")))


# ---------------------------------------------------------------------- damaged files


def _damage(folder: Path, how: str) -> None:
    js, st = folder / "graph.json", folder / "graph.safetensors"
    doc = json.loads(js.read_text())
    if how == "empty safetensors":
        st.write_bytes(b"")
    elif how == "truncated safetensors":
        st.write_bytes(st.read_bytes()[:100])
    elif how == "malformed json":
        js.write_text(js.read_text()[:-20])
    elif how == "non-utf8 json":
        js.write_bytes(b"\xff\xfe" + js.read_bytes())
    elif how == "json list":
        js.write_text("[]")
    elif how == "missing key":
        del doc["nodes"]
        js.write_text(json.dumps(doc))
    elif how == "wrong type":
        doc["nodes"][0]["layer"] = "deep"
        js.write_text(json.dumps(doc))
    elif how == "node missing a field":
        del doc["nodes"][3]["pos"]
        js.write_text(json.dumps(doc))
    elif how == "nodes and adjacency disagree":
        doc["nodes"] = doc["nodes"][:-1]
        js.write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["empty safetensors", "truncated safetensors", "malformed json",
                                 "non-utf8 json", "json list", "missing key", "wrong type",
                                 "node missing a field", "nodes and adjacency disagree"])
def test_damaged_saved_graph(graph, tmp_path, how):
    folder = graph.save(tmp_path / "g")
    _damage(folder, how)
    with pytest.raises(CircuitlabError, match=r"graph\.(json|safetensors)|lacks|nodes"):
        Graph.load(folder)


def _np_doc(graph) -> dict:
    return json.loads(json.dumps(graph.prune().to_neuronpedia()))


@pytest.mark.parametrize("how", ["no ctx_idx", "no layer", "position out of range",
                                 "non-numeric weight", "no nodes", "nodes not a list",
                                 "not an object"])
def test_damaged_neuronpedia_json(graph, how):
    doc = _np_doc(graph)
    feature = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    if how == "no ctx_idx":
        del feature["ctx_idx"]
    elif how == "no layer":
        del feature["layer"]
    elif how == "position out of range":
        feature["ctx_idx"] = 999
    elif how == "non-numeric weight":
        doc["links"][0]["weight"] = "heavy"
    elif how == "no nodes":
        doc["nodes"] = []
    elif how == "nodes not a list":
        doc["nodes"] = {"a": 1}
    elif how == "not an object":
        doc = [doc]
    with pytest.raises(CircuitlabError):
        Graph.from_neuronpedia(doc)


def test_neuronpedia_file_not_utf8(tmp_path):
    (tmp_path / "g.json").write_bytes(b'{"nodes": "\xff"}')
    with pytest.raises(CircuitlabError, match="Cannot read"):
        Graph.from_neuronpedia(tmp_path / "g.json")


def test_validate_an_imported_graph(graph, tiny_rm):
    imported = Graph.from_neuronpedia(_np_doc(graph))
    with pytest.raises(CircuitlabError, match="records no logit directions"):
        imported.validate(tiny_rm)


# ---------------------------------------------------------------------- user text stays inert


def test_markup_in_labels_and_prompts_is_escaped_in_the_explorer(tiny_rm):
    """User text reaches the notebook explorer as data, never as markup: the widget's traits
    and payload carry it raw, and the front end writes text only through textContent (its
    two innerHTML writes are its own static skeleton and legend). The browser tests check
    the rendered page, in the HTML file and in JupyterLab."""
    from importlib.resources import files

    evil = "</script><img src=x onerror=alert(1)><script>alert(2)</script>"
    g = circuitlab.attribute(tiny_rm, "a <b>x</b>", max_feature_nodes=None, progress=False)
    view = g.show(tiny_rm, prune=False)
    node = g.nodes[g.nodes.kind == "feature"].node_id.iloc[0]
    view.label(node, evil)
    view.group([node], evil)
    assert view.labels[node] == evil and evil in view.supernodes
    assert "<" not in view._data and json.loads(view._data)["prompt"] == "a <b>x</b>"
    js = (files("circuitlab.viz") / "viewer.js").read_text()
    assert re.findall(r"(\S+)\.innerHTML = ", js) == ["root", '$("cl-legend")']
    assert "SKELETON" in js.split("root.innerHTML = ")[1].split(";")[0]


# ---------------------------------------------------------------------- fuzz


class _Timeout(Exception):
    pass


def _bounded(seconds: int):
    def on_alarm(signum, frame):
        raise _Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)


def _random_value(rng: random.Random):
    return rng.choice([None, 0, 1, -1, 3, 2.5, -0.5, float("nan"), float("inf"), True, "",
                       " large", "x", [], [0], ["the"], (1, 2), {"a": 1}, torch.int32,
                       torch.float32, torch.bfloat16, 10 ** 12])


def _random_prompt(rng: random.Random) -> str:
    alphabet = "the cat sat on mat.,!? \n\t\"'<>&éß中\ud800\U0001F600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


def test_fuzz_attribute_and_interventions(tiny_rm, graph):
    """Random prompts, options and edit specs: each call returns a valid result or raises a
    ``CircuitlabError``, within 20 seconds."""
    rng = random.Random(0)
    options = ["max_logits", "logit_prob", "max_feature_nodes", "batch_size", "dtype",
               "memory_limit", "logit_targets"]
    outcomes = {"ok": 0, "error": 0}
    try:
        for _ in range(60):
            _bounded(20)
            kwargs = {k: _random_value(rng) for k in rng.sample(options, rng.randint(0, 3))}
            prompt = _random_prompt(rng) if rng.random() < 0.5 else PROMPT
            try:
                g = circuitlab.attribute(tiny_rm, prompt, progress=False, **kwargs)
                sums = g.adjacency.sum(1) + g.constants  # exact up to bf16 rounding
                assert torch.isfinite(g.adjacency).all() and torch.allclose(
                    sums, g.inputs, atol=5e-2, rtol=5e-2)
                outcomes["ok"] += 1
            except CircuitlabError:
                outcomes["error"] += 1
            feature = (rng.randint(-2, 4), rng.randint(-5, 60))
            spec = rng.choice([ablate([feature]), set_to([feature], rng.choice([1.0, 1e3, -2.0])),
                               [(feature[0], rng.randint(-9, 9), feature[1], 1.0)],
                               [_random_value(rng)], _random_value(rng)])
            try:
                tiny_rm.intervene(PROMPT, spec, mode=rng.choice(["free", "constrained",
                                                                 "frozen-attention"]),
                                  pos=rng.choice([-1, 0, 3, 99, "all"]))
                outcomes["ok"] += 1
            except CircuitlabError:
                outcomes["error"] += 1
    finally:
        signal.alarm(0)
    assert outcomes["ok"] > 5 and outcomes["error"] > 5, outcomes


def _mutate(doc, rng: random.Random):
    """``doc`` with one random field deleted, retyped or set to a strange value."""
    doc = json.loads(json.dumps(doc))
    holders = [doc] + [n for n in doc.get("nodes", []) if isinstance(n, dict)][:50]
    if "links" in doc:
        holders += doc["links"][:50]
    holder = rng.choice(holders)
    key = rng.choice(list(holder))
    if rng.random() < 0.4:
        del holder[key]
    else:
        holder[key] = _random_value(rng) if not isinstance(_random_value(rng), torch.dtype) else "x"
    return doc


def test_fuzz_graph_files(graph, tmp_path):
    rng = random.Random(1)
    folder = graph.save(tmp_path / "g")
    original = (folder / "graph.json").read_text()
    np_doc = _np_doc(graph)
    for i in range(80):
        doc = _mutate(json.loads(original), rng)
        (folder / "graph.json").write_text(json.dumps(doc, default=str))
        try:
            loaded = Graph.load(folder)
            loaded.prune()
        except CircuitlabError:
            pass
        try:
            Graph.from_neuronpedia(_mutate(np_doc, rng)).prune()
        except CircuitlabError:
            pass


# ---------------------------------------------------------------------- kill tests

WRITER = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model, tiny_transcoders
    import circuitlab
    from circuitlab.replacement import ReplacementModel
    from circuitlab.sidecar import write as write_labels
    from circuitlab.train.build_cards import build_examples
    from circuitlab.train.checkpoints import save_checkpoint
    from circuitlab.train.export import export_layers

    @dataclasses.dataclass(frozen=True)
    class Settings:
        width: int = 8

    out = Path({out!r})
    tiny = tiny_model("gemma3")
    tcs = tiny_transcoders(tiny, "jumprelu_skip_transcoder")
    rm = ReplacementModel(tiny, tcs, name="tiny")
    g = circuitlab.attribute(rm, "the cat sat.", max_feature_nodes=None, progress=False)
    version = int(sys.argv[1])
    print("ready", flush=True)
    while True:
        version += 1
        g.metadata["version"] = version
        g.save(out / "graph")
        write_labels(out / "graph", {{"labels": {{"v": str(version)}}, "supernodes": {{}}, "pinned": []}})
        build_examples(rm, out / "corpus", tokens=60, context=12, batch_size=2, progress=False,
                       out=out / "cards.safetensors", command=str(version))
        save_checkpoint(out / "ckpt", {{"w": torch.full((64, 64), float(version))}}, Settings(),
                        {{"version": version}})
        export_layers(dict(enumerate(tcs)), out / "export", {{"version": version}})
        print("done", version, flush=True)
""")


def _versions(out: Path) -> dict:
    """The version each file on disk holds (each must load)."""
    found = {}
    if (out / "graph" / "graph.json").exists():
        found["graph"] = Graph.load(out / "graph").metadata["version"]
        labels = Graph.load(out / "graph").labels
        if labels:
            found["labels"] = int(labels["v"])
    if (out / "cards.safetensors").exists():
        from circuitlab.cards import read_examples

        found["cards"] = int(read_examples(out / "cards.safetensors").meta["command"])
    if (out / "ckpt" / "state.safetensors").exists():
        found["checkpoint"] = int(load_file(out / "ckpt" / "state.safetensors")["w"][0, 0])
        json.loads((out / "ckpt" / "settings.json").read_text())
    if (out / "export" / "manifest.json").exists():
        verify_manifest(out / "export", "training export", "resume the run")
        found["export"] = json.loads((out / "export" / "manifest.json").read_text())["version"]
    return found


def _temp_pids(out: Path) -> set[int]:
    """The process ids in the names of the temporary files and folders under ``out``.

    ``os.walk`` skips a folder that the live writer removes while it is being listed
    (``Path.rglob`` raises instead)."""
    names = (name for _, dirs, files in os.walk(out) for name in dirs + files if name.startswith("."))
    return {int(m[1]) for m in map(re.compile(r"\..+\.(\d+)\.\w+").fullmatch, names) if m}


@pytest.mark.slow
def test_sigkill_while_saving_leaves_old_or_new_versions(tmp_path):
    """20 SIGKILLs at random moments of a process that saves a graph, its labels, feature
    cards, a training checkpoint and a training export in a loop: afterwards every file loads
    and holds the last version reported done or the one being written, and the temporary
    files of earlier killed writers are gone (the next writer removed them)."""
    out = tmp_path / "out"
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "heldout.jsonl").write_text(
        "".join(json.dumps({"text": "the cat sat on the mat. " * 4}) + "\n" for _ in range(8)))
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(TESTS), out=str(out)))
    rng = random.Random(0)
    done, kills = 0, 0
    while kills < 20:
        proc = subprocess.Popen([sys.executable, str(script), str(done)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "CIRCUITLAB_CACHE": str(tmp_path / "c")})
        assert proc.stdout.readline().strip() == "ready"
        target = done + rng.randint(1, 3)
        while done < target:
            line = proc.stdout.readline()
            assert line.startswith("done"), line
            done = int(line.split()[1])
        time.sleep(rng.uniform(0.0, 0.25))
        assert _temp_pids(out) <= {proc.pid}  # the writer before this one left nothing behind
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read().split()
        done = max([done] + [int(x) for x in rest if x.isdigit()])
        kills += 1
        versions = _versions(out)
        assert set(versions) == {"graph", "labels", "cards", "checkpoint", "export"}
        for kind, v in versions.items():
            assert v in (done, done + 1), (kind, v, done)
    assert done >= 20


def test_next_write_removes_what_dead_writers_left(tmp_path):
    """Temporaries of a killed writer (file or folder) go at the next write to the same place;
    a live writer's, other names' and the user's own files stay."""
    from circuitlab.files import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    left = [tmp_path / f".labels.json.{dead}.abc_1", tmp_path / f".labels.json.{dead}.x2",
            tmp_path / ".labels.json.old"]
    kept = [tmp_path / f".labels.json.{os.getpid()}.live", tmp_path / f".other.json.{dead}.ab",
            tmp_path / f".labels.json.7.{dead}.ab", tmp_path / ".labels.json.mine"]
    for p in left[:1] + kept:
        p.write_text("x")
    for p in left[1:]:
        p.mkdir()
        (p / "inner").write_text("x")
    atomic_write_text(tmp_path / "labels.json", "{}")
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)

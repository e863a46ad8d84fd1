"""Training inputs that cannot be used, a corpus changed under a checkpoint, an unusable
cache and duplicate Neuronpedia node ids: each ends in a correct result or a
``CircuitlabError`` that names the file, field or value and the fix (the CLI prints it and
exits 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from conftest import SMALL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from circuitlab import Graph, cli, commands, files
from circuitlab.errors import CircuitlabError
from circuitlab.train import checkpoints, trainer
from circuitlab.train.corpus import build_corpus
from circuitlab.train.sources import Source
from circuitlab.train.trainer import train_transcoders

#: ``circuitlab train`` options of the ``SMALL`` settings.
TRAIN = ["--width", "64", "--k", "4", "--context", "64", "--batch-tokens", "512",
         "--buffer-tokens", "2048", "--tokens", "512"]


@pytest.fixture
def train_cli(model, monkeypatch, capsys):
    """``train_cli(out, *options)``: ``(exit status, stderr)`` of ``circuitlab train`` on the
    tiny model."""
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)

    def run(out, *options):
        status = cli.main(["train", "--out", str(out), *TRAIN, *options])
        return status, capsys.readouterr().err

    return run


def own_line(err: str, message: str) -> bool:
    """Whether ``err`` has a line starting with ``circuitlab: `` and then ``message`` (a
    regular expression), not glued to a progress bar."""
    return re.search(rf"(^|\n)circuitlab: {message}", err) is not None


# ----------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a first document of some words"}', '{"text": broken'],
     r"bad\.jsonl, line 2: not valid JSON \(Expecting value at column 10\).*fix or delete"),
    (['{"body": "text in another field"}'],
     r'bad\.jsonl, line 1: no "text" field holding a string \(got keys \[\'body\'\]\)'),
    (['{"text": 42}'], r'bad\.jsonl, line 1: no "text" field holding a string \(got int\)'),
])
def test_damaged_jsonl_corpus_names_file_and_line(train_cli, tmp_path, lines, message):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, err = train_cli(tmp_path / "out", "--corpus", str(corpus))
    assert status == 2 and own_line(err, re.escape(str(tmp_path)) + "/" + message)


@pytest.mark.parametrize("name, content, why", [
    ("empty.txt", "", "its text is empty or only whitespace"),
    ("blank.txt", "  \n\n \t\n", "its text is empty or only whitespace"),
    ("blank.jsonl", '{"text": "   "}\n\n', "its text is empty or only whitespace"),
    ("missing.txt", None, r"it does not exist\. Build the corpus with `circuitlab corpus`"),
    ("folder", "", r"it holds no \.txt files"),
])
def test_corpus_without_text_is_reported_before_the_model_loads(model, tmp_path, monkeypatch,
                                                                 capsys, name, content, why):
    """The message is the first line on stderr: no progress bar is drawn over it, and the
    model is not even loaded."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(commands, "load_model", no_model)
    corpus = tmp_path / name
    if name == "folder":
        corpus.mkdir()
    elif content is not None:
        corpus.write_text(content, encoding="utf-8")
    status = cli.main(["train", "--out", str(tmp_path / "out"), "--corpus", str(corpus), *TRAIN])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"circuitlab: no usable text in {corpus}: ") and re.search(why, err)


def test_training_error_closes_the_progress_bar_first(model, tmp_path, capsys):
    """An error met while training (here: too little text) is raised after the progress
    bar is closed with its newline, so the CLI's message gets a line of its own."""
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short", encoding="utf-8")
    try:
        train_transcoders(model, corpus, tmp_path / "out", tokens=512,
                          **{**SMALL, "progress": True})
    except CircuitlabError as error:  # read stderr while the error (and its frames) lives
        err = capsys.readouterr().err
        assert f"corpus {corpus} has fewer" in str(error)
    else:
        pytest.fail("training on too little text did not raise")
    assert "Training transcoders" in err and err.endswith("\n")


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("layers, bad", [("a,b", "a"), ("0,x", "x"), ("1.5", "1.5")])
def test_layers_that_are_not_integers(train_cli, corpus, tmp_path, layers, bad):
    status, err = train_cli(tmp_path / "out", "--corpus", str(corpus), "--layers", layers)
    assert status == 2
    assert own_line(err, f"--layers {re.escape(layers)}: '{re.escape(bad)}' is not a layer "
                    r"number; pass comma-separated integers such as 0,3,5\.")


@pytest.mark.parametrize("lr", ["nan", "-1", "0", "inf"])
def test_learning_rate_must_be_finite_and_positive(train_cli, model, corpus, tmp_path, lr):
    status, err = train_cli(tmp_path / "out", "--corpus", str(corpus), "--lr", lr)
    assert status == 2
    assert own_line(err, rf"--lr={float(lr)!r} is not allowed; pass a finite number > 0\.")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CircuitlabError, match=rf"lr={float(lr)!r} must be a finite number > 0"):
        train_transcoders(model, corpus, tmp_path / "api", tokens=512,
                          **{**SMALL, "lr": float(lr)})


def test_width_that_does_not_fit_in_memory(train_cli, model, corpus, tmp_path, monkeypatch):
    """With 32 MiB available (patched), width 4096 of the tiny model needs about 0.08 GiB."""
    monkeypatch.setattr(trainer, "free_memory", lambda device: 32 * 2**20)
    status, err = train_cli(tmp_path / "out", "--corpus", str(corpus), "--width", "4096",
                            "--no-bf16")
    assert status == 2
    found = re.search(r"width=4096 does not fit in memory: training 3 layers of d_model=32 with "
                      r"a buffer of 2048 tokens needs about 0\.08 GiB, and cpu has 0\.03 GiB "
                      r"available; the largest width that fits is (\d+): pass it or less "
                      r"\(--width\), or train fewer layers \(--layers\)\.", err)
    assert found and own_line(err, "width=4096")
    largest = int(found[1])
    for width, fits in ((largest, True), (largest + 1, False)):
        per_feature, fixed = trainer.training_memory(
            trainer.Settings("tiny", 3, 32, (0, 1, 2), width, 4, 16, 2048, 64, 512, 2048, 1,
                             3e-3, 0.1, False, 0, str(corpus)))
        assert (per_feature * width + fixed <= 32 * 2**20) is fits
    monkeypatch.setattr(trainer, "free_memory", lambda device: 1)
    with pytest.raises(CircuitlabError, match="no width fits: lower buffer_tokens"):
        train_transcoders(model, corpus, tmp_path / "api", tokens=512, **SMALL)


# ----------------------------------------------------------------------------- resuming


@pytest.fixture
def own_corpus(corpus, tmp_path):
    """A copy of ``corpus`` that a test may change."""
    return shutil.copy(corpus, tmp_path / "text.txt")


@pytest.mark.parametrize("change", ["append", "same size", "replace"])
def test_resume_refuses_a_corpus_changed_in_place(model, own_corpus, tmp_path, change):
    out = tmp_path / "out"
    train_transcoders(model, own_corpus, out, tokens=512, **SMALL)
    text = own_corpus.read_text(encoding="utf-8")
    if change == "append":
        own_corpus.write_text(text + "\n\nmore text at the end", encoding="utf-8")
    elif change == "same size":
        own_corpus.write_text("X" + text[1:], encoding="utf-8")
    else:
        own_corpus.unlink()
        own_corpus.write_text(text, encoding="utf-8")  # same text, a new file
    message = (f"The corpus file {re.escape(str(own_corpus))} changed .* since the checkpoint in "
               f"{re.escape(str(out / 'checkpoint'))} was made.*Restore the file, or pass "
               r"--fresh \(resume=False\) to start over\.")
    with pytest.raises(CircuitlabError, match=message):
        train_transcoders(model, own_corpus, out, tokens=1_024, **SMALL)
    train_transcoders(model, own_corpus, out, tokens=1_024, resume=False, **SMALL)


def test_cli_resume_refuses_a_changed_corpus(train_cli, own_corpus, tmp_path):
    out = tmp_path / "out"
    assert train_cli(out, "--corpus", str(own_corpus))[0] == 0
    with open(own_corpus, "a", encoding="utf-8") as f:
        f.write("\n\nan appended paragraph")
    status, err = train_cli(out, "--corpus", str(own_corpus), "--tokens", "1024")
    assert status == 2 and own_line(err, f"The corpus file {re.escape(str(own_corpus))} changed "
                                         r"\(size \d+ -> \d+ bytes\) since the checkpoint")
    assert train_cli(out, "--corpus", str(own_corpus), "--tokens", "1024", "--fresh")[0] == 0


def test_resume_of_a_folder_corpus_notices_a_new_file(model, own_corpus, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    shutil.move(own_corpus, folder / "a.txt")
    train_transcoders(model, folder, tmp_path / "out", tokens=512, **SMALL)
    (folder / "b.txt").write_text("another document " * 20, encoding="utf-8")
    with pytest.raises(CircuitlabError, match=f"{re.escape(str(folder / 'b.txt'))} was added "
                       "since the checkpoint"):
        train_transcoders(model, folder, tmp_path / "out", tokens=1_024, **SMALL)


def test_checkpoint_without_fingerprint_still_resumes(model, own_corpus, tmp_path):
    """A checkpoint written before fingerprints resumes after any change, and records the
    corpus from then on."""
    out = tmp_path / "out"
    train_transcoders(model, own_corpus, out, tokens=512, **SMALL)
    file = out / "checkpoint" / checkpoints.CHECKPOINT_FILE
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    counters = json.loads(meta["counters"])
    del counters["corpus_fingerprint"]
    save_file(load_file(file), file, metadata={**meta, "counters": json.dumps(counters)})
    with open(own_corpus, "a", encoding="utf-8") as f:
        f.write("\n\nan appended paragraph")
    train_transcoders(model, own_corpus, out, tokens=1_024, **SMALL)
    saved = json.loads((out / "checkpoint" / "settings.json").read_text())
    assert saved["tokens_seen"] >= 1_024 and str(own_corpus) in saved["corpus_fingerprint"]


# ----------------------------------------------------------------------------- the cache


FAKE = {"english": Source(lambda: iter(["some words of text " * 10] * 5), "en", 1.0)}
CACHE_FIX = r"Point CIRCUITLAB_CACHE at a writable folder"


def test_cache_that_is_a_file(tmp_path, monkeypatch, train_cli, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(cache))
    message = (f"The circuitlab cache {re.escape(str(cache))} cannot be used: "
               f"{re.escape(str(cache))} is a file, not a folder\\. {CACHE_FIX}")
    with pytest.raises(CircuitlabError, match=message):
        build_corpus(sources=FAKE, tokens=100, progress=False)
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(cache / "below"))
    with pytest.raises(CircuitlabError, match="is a file, not a folder"):
        files.cache_dir()
    status, err = train_cli(tmp_path / "out")  # the default corpus is in the cache
    assert status == 2 and own_line(err, "The circuitlab cache .*" + CACHE_FIX)


def test_cache_that_cannot_be_written(tmp_path, monkeypatch, train_cli):
    """A read-only (0o555) empty folder is refused. Root writes through any mode, so as root
    ``os.access`` is patched to answer for that folder as it would for another user."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, **kwargs):
            return not (str(path) == str(cache) and mode & os.W_OK) and real(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(cache))
    try:
        with pytest.raises(CircuitlabError, match=f"{re.escape(str(cache))} cannot be written\\. "
                           f"{CACHE_FIX}"):
            build_corpus(sources=FAKE, tokens=100, progress=False)
        status, err = train_cli(tmp_path / "out")
        assert status == 2 and own_line(err, "The circuitlab cache .*cannot be written")
        assert not any(cache.iterdir())
        monkeypatch.setenv("CIRCUITLAB_CACHE", str(cache / "corpus"))  # inside it: same
        with pytest.raises(CircuitlabError, match="cannot be written"):
            files.cache_dir()
    finally:
        cache.chmod(0o755)


def test_read_only_cache_with_content_can_be_read(tmp_path, monkeypatch):
    """A read-only cache that someone filled is still usable for reading."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(cache))
    assert files.cache_dir() == cache


# ----------------------------------------------------------------------------- Neuronpedia


def neuronpedia_doc(*extra_nodes) -> dict:
    """A small valid Neuronpedia graph JSON, with ``extra_nodes`` added."""
    nodes = [
        {"node_id": "E_10_0", "feature_type": "embedding", "layer": "E", "ctx_idx": 0},
        {"node_id": "E_11_1", "feature_type": "embedding", "layer": "E", "ctx_idx": 1},
        {"node_id": "0_3_1", "feature_type": "transcoder", "layer": "0", "ctx_idx": 1,
         "feature": 3, "activation": 1.0, "influence": 0.5},
        {"node_id": "27_5_1", "feature_type": "logit", "layer": "2", "ctx_idx": 1,
         "token_prob": 0.5, "clerp": 'Output "x" (p=0.500)'},
    ]
    return {"metadata": {"prompt_tokens": ["a", "b"], "prompt": "ab"}, "qParams": {},
            "nodes": nodes + list(extra_nodes),
            "links": [{"source": "E_11_1", "target": "0_3_1", "weight": 0.5},
                      {"source": "0_3_1", "target": "27_5_1", "weight": 1.0}]}


def test_neuronpedia_duplicate_node_ids_are_refused(tmp_path):
    assert len(Graph.from_neuronpedia(neuronpedia_doc()).nodes) == 4
    twin = {"node_id": "0_3_1", "feature_type": "transcoder", "layer": "0", "ctx_idx": 0,
            "feature": 3, "activation": 2.0}
    message = r"has 2 nodes with node_id '0_3_1'; each node needs its own node_id"
    with pytest.raises(CircuitlabError, match=message):
        Graph.from_neuronpedia(neuronpedia_doc(twin))
    (tmp_path / "np.json").write_text(json.dumps(neuronpedia_doc(twin, dict(twin, ctx_idx=1))))
    with pytest.raises(CircuitlabError, match=r"3 nodes with node_id '0_3_1'"):
        Graph.from_neuronpedia(tmp_path / "np.json")

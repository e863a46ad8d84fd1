"""Tests for the offline corpus builder; nothing here downloads."""

import hashlib
import json

import pytest

from circuitlab.files import verify_manifest
from circuitlab.train.corpus import build_corpus, iter_documents
from circuitlab.train.sources import Source, _pack, _strip_wikitext, fetch
from circuitlab.train.sources import chunks as _chunks


def fake_docs(prefix, n=40):
    return [f"{prefix} document {i}: " + "some words of text " * 10 for i in range(n)]


FAKE = {
    "english": Source(lambda: iter(fake_docs("en")), "en", 0.7),
    "chinese": Source(lambda: iter(fake_docs("中文", 20)), "zh", 0.3),
}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_iter_documents_txt_jsonl_and_dir(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.txt")) == ["first file"]
    assert list(iter_documents(tmp_path)) == ["first file", "second file"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two", "source": "x"}\n', encoding="utf-8")
    assert list(iter_documents(jsonl)) == ["one", "two"]


def test_iter_documents_cuts_long_text(tmp_path):
    (tmp_path / "long.txt").write_text("\n\n".join(["paragraph " * 100] * 40), encoding="utf-8")
    docs = list(iter_documents(tmp_path / "long.txt"))
    assert len(docs) > 1 and all(len(d) <= 8_000 for d in docs)


@pytest.mark.parametrize("name", ["missing", "empty.txt", "emptydir"])
def test_iter_documents_rejects_no_text(tmp_path, name):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no usable text"):
        list(iter_documents(tmp_path / name))


def test_iter_documents_heldout_needs_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match="held-out"):
        list(iter_documents(tmp_path, split="heldout"))


def test_build_corpus_split_manifest_and_determinism(tmp_path):
    a = build_corpus(tmp_path / "a", tokens=10_000, heldout_fraction=0.25, seed=1, sources=FAKE, progress=False)
    b = build_corpus(tmp_path / "b", tokens=10_000, heldout_fraction=0.25, seed=1, sources=FAKE, progress=False)
    c = build_corpus(tmp_path / "c", tokens=10_000, heldout_fraction=0.25, seed=2, sources=FAKE, progress=False)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()

    train, heldout = read_jsonl(a / "train.jsonl"), read_jsonl(a / "heldout.jsonl")
    assert train and heldout
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["source"] for r in train} == {"english", "chinese"}
    assert all(r["lang"] == ("zh" if r["source"] == "chinese" else "en") for r in train + heldout)
    assert [r["text"] for r in train] != sorted(r["text"] for r in train)  # shuffled

    manifest = json.loads((a / "manifest.json").read_text(encoding="utf-8"))
    for name in ("train.jsonl", "heldout.jsonl"):
        assert manifest["sha256"][name] == hashlib.sha256((a / name).read_bytes()).hexdigest()
    verify_manifest(a, "the corpus", "rebuild it")
    assert manifest["documents"] == {"train.jsonl": len(train), "heldout.jsonl": len(heldout)}
    assert sum(s["documents"] for s in manifest["sources"].values()) == len(train) + len(heldout)
    assert abs(sum(manifest["languages"].values()) - 1) < 1e-9
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert list(iter_documents(a, split="heldout")) == [r["text"] for r in heldout]


def test_build_corpus_caps_sources_by_share(tmp_path):
    many = {"big": Source(lambda: iter(fake_docs("big", 1000)), "en", 0.5),
            "small": Source(lambda: iter(fake_docs("small", 1000)), "en", 0.5)}
    out = build_corpus(tmp_path, tokens=5_000, heldout_fraction=0, sources=many, progress=False)
    stats = json.loads((out / "manifest.json").read_text())["sources"]
    for s in stats.values():
        assert 2_500 <= s["tokens_estimate"] < 2_600 and s["documents"] < s["available_documents"]


def test_build_corpus_without_text_raises(tmp_path):
    empty = {"empty": Source(lambda: iter(["", "   ", "short"]), "en", 1.0)}
    with pytest.raises(ValueError, match="no usable text"):
        build_corpus(tmp_path, sources=empty, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_build_corpus_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown sources"):
        build_corpus(tmp_path, sources=["no_such_source"], progress=False)


def test_failed_download_names_command(tmp_path):
    with pytest.raises(RuntimeError, match=r"apt-get download -q circuitlab-no-such-package.*sources="):
        fetch("apt:circuitlab-no-such-package", tmp_path)  # apt looks it up locally: no network
    assert [p.name for p in tmp_path.iterdir()] == []


def test_helpers():
    assert list(_pack(["a" * 5, "b" * 5, "c"], size=8)) == ["a" * 5 + "\n\n" + "b" * 5, "c"]
    assert [len(p) for p in _chunks("word " * 10, size=12)] == [9, 9, 9, 9, 9]
    assert list(_chunks("abc = 1\n    b = 2\n", size=14)) == ["abc = 1", "    b = 2"]  # indentation survives
    wiki = "'''Cat''' is a [[mammal|small mammal]]{{cite|x}}.<ref>r</ref> [[File:C.jpg|thumb|a [[cat]]]]\n==References==\nx"
    assert _strip_wikitext(wiki) == "Cat is a small mammal."

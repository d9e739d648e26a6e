"""Real text that installs offline, one loader per corpus (each raises a clear error naming the package to install).

========== ===================================================== ================================================
domain     source                                                install
========== ===================================================== ================================================
bible      King James Bible, decoded by the ``bible`` CLI        Debian ``bible-kjv`` (pulls ``bible-kjv-text``)
wiki       gensim's English Wikipedia test sample (106 articles) ``pip install --no-deps gensim`` (only its data
                                                                 file is read; gensim is never imported)
code       the CPython standard library's ``.py`` files          nothing: the running interpreter's stdlib
========== ===================================================== ================================================

Every loader returns one string and is deterministic (fixed file order), so splits are reproducible.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

DOMAINS = ("bible", "wiki", "code")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class CorpusMissing(RuntimeError):
    """A corpus's package is not installed; the message says which one."""


@lru_cache(maxsize=2)
def bible_text() -> str:
    """The KJV Bible, Genesis to Revelation, as the ``bible`` CLI prints it (book headings, numbered verses)."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusMissing("the Bible corpus needs the Debian package 'bible-kjv': apt-get install bible-kjv")
    out = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=60)
    if out.returncode != 0 or len(out.stdout) < 1_000_000:
        raise CorpusMissing(f"'bible Gen1:1-Rev22:21' failed (rc={out.returncode}): {out.stderr.strip()[:200]}; "
                            "reinstall bible-kjv and bible-kjv-text")
    return out.stdout


_WIKI_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^\{\|.*?^\|\}", re.S | re.M), ""),  # tables
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        two = text[i:i + 2]
        if two == "{{":
            depth += 1
            i += 2
        elif two == "}}" and depth:
            depth -= 1
            i += 2
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup (templates, references, tables, link syntax and tags removed)."""
    text = _strip_templates(html.unescape(text))
    for pat, rep in _WIKI_PATTERNS:
        text = pat.sub(rep, text)
    return text.strip()


def _wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissing("the Wikipedia sample needs the PyPI package 'gensim' (its test data file only): "
                            "pip install --no-deps gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_FILE
    if not path.exists():
        raise CorpusMissing(f"gensim is installed but {path.name} is missing from its test data; reinstall gensim")
    return path


@lru_cache(maxsize=2)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """``(title, plain text)`` of every non-redirect article of gensim's Wikipedia sample, in file order."""
    arts = []
    with bz2.open(_wiki_path()) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = text = ""
            for child in el.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = child.text or ""
                elif tag == "text":
                    text = child.text or ""
            el.clear()
            if text and not text.lstrip().lower().startswith("#redirect"):
                body = clean_wikitext(text)
                if len(body) > 200:
                    arts.append((title, body))
    return tuple(arts)


def wiki_text() -> str:
    """The Wikipedia sample as one string: each article's title, a blank line, its text."""
    return "\n\n".join(f"{t}\n\n{b}" for t, b in wiki_articles())


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip",
              "turtledemo", "idlelib", "tkinter", "pydoc_data", "config-3.11-x86_64-linux-gnu"}


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), sorted by relative path; the first files
    up to ``max_bytes`` in total if given."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusMissing(f"the Python standard library source is not at {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CorpusMissing(f"no .py files under {root}: this Python ships without its standard library source")
    if max_bytes is not None:
        out, total = [], 0
        for p in files:
            size = p.stat().st_size
            if total + size > max_bytes and out:
                break
            out.append(p)
            total += size
        files = out
    return files


def code_text(max_bytes: int | None = 4_000_000) -> str:
    """Standard-library source files joined (each preceded by a ``# file: name`` line)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for p in stdlib_files(max_bytes):
        parts.append(f"# file: {p.relative_to(root).as_posix()}\n{p.read_text(encoding='utf-8', errors='replace')}")
    return "\n\n".join(parts)


def load_domain(name: str, max_chars: int | None = None) -> str:
    """One domain's text (``"bible"``, ``"wiki"`` or ``"code"``), optionally cut to ``max_chars``."""
    loaders = {"bible": bible_text, "wiki": wiki_text, "code": code_text}
    if name not in loaders:
        raise ValueError(f"load_domain: unknown domain {name!r}; valid: {', '.join(DOMAINS)}")
    text = loaders[name]()
    return text if max_chars is None else text[:max_chars]


def split_text(text: str, fractions: tuple[float, float] = (0.9, 0.1), *, blocks: int = 20) -> tuple[str, str]:
    """(train, validation) of ``text``: it is cut into ``blocks`` equal blocks, and the last ``fractions[1]`` of each
    block goes to validation, so both splits cover the whole corpus (e.g. every part of the Bible)."""
    if not 0 < fractions[1] < 1:
        raise ValueError(f"split_text: the validation fraction must be in (0, 1), got {fractions[1]}")
    n = len(text)
    size = max(1, n // blocks)
    train, val = [], []
    for start in range(0, n, size):
        block = text[start:start + size]
        cut = int(len(block) * (1 - fractions[1]))
        train.append(block[:cut])
        val.append(block[cut:])
    return "".join(train), "".join(val)

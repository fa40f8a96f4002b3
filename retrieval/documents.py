"""Documents into the hierarchy: text, markdown and HTML -> sections (by headings; by size where there are
none) -> chunks (by tokens, tiktoken's count, with overlap, cut at paragraph and sentence boundaries).

Pure functions of the text: nothing here touches a database or a model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tollway.tokens import count_text, encoding

FORMATS = ("text", "markdown", "html")


class DocumentError(ValueError):
    """The document cannot be ingested (empty, binary, unknown format); the message says why."""


class DocumentTooLarge(DocumentError):
    """A document over the gateway's limits (its tokens, or the time or memory its parse takes): a 413."""


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Section:
    heading: str  # the heading path, "Fees > Overdraft" ("" before the first heading)
    text: str
    tokens: int
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True, slots=True)
class Parsed:
    title: str
    format: str
    content_hash: str
    tokens: int
    sections: tuple[Section, ...] = field(default_factory=tuple)

    @property
    def chunks(self) -> int:
        return sum(len(s.chunks) for s in self.sections)


@dataclass(frozen=True, slots=True)
class Splitting:
    chunk_tokens: int = 200
    chunk_overlap: int = 32
    section_tokens: int = 1024  # a section without headings, or an oversized one, is cut at about this
    # a document of at most this many tokens is one chunk, never split (0: off); about what the packaged
    # embedder reads of a text (256 word pieces), so a whole document is embedded whole
    whole_tokens: int = 240

    @property
    def tag(self) -> str:
        """The settings in a few characters (part of the index version): c200o32s1024w300."""
        return f"c{self.chunk_tokens}o{self.chunk_overlap}s{self.section_tokens}w{self.whole_tokens}"


def content_hash(text: str, fmt: str, title: str, metadata: str, settings: str = "") -> str:
    """What decides a document's chunks: the same hash is an unchanged document (not written again). The
    splitting settings are part of it, so a document re-ingested under new settings is split anew."""
    return hashlib.sha256("\x00".join((fmt, title, metadata, text, settings)).encode()).hexdigest()


def guess_format(name: str, declared: str | None = None) -> str:
    if declared:
        if declared not in FORMATS:
            raise DocumentError(f"format must be one of {', '.join(FORMATS)}")
        return declared
    lower = name.lower()
    if lower.endswith((".md", ".markdown", ".mdx")):
        return "markdown"
    if lower.endswith((".html", ".htm", ".xhtml")):
        return "html"
    return "text"


def decode(raw: bytes) -> str:
    """Bytes of a text document -> str; binary content (NUL bytes, not UTF-8) is refused."""
    if b"\x00" in raw[:8192]:
        raise DocumentError("the document looks binary (it contains NUL bytes); send text, markdown or HTML")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"the document is not valid UTF-8 (byte {exc.start}); send text, markdown or "
                            "HTML") from None


def _check_text(text: str) -> str:
    if "\x00" in text:
        raise DocumentError("the document contains NUL characters; send text, markdown or HTML")
    control = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if control > max(8, len(text[:65536]) // 100):
        raise DocumentError("the document looks binary (control characters); send text, markdown or HTML")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError("the document is empty")
    return text


# -- sections ------------------------------------------------------------------------------------
Block = tuple[int, str]  # (heading level, heading) or (0, body text)


def _markdown_blocks(text: str) -> Iterator[Block]:
    """Headings found by markdown-it (so a '#' inside a code block is not one), body text kept as written."""
    from markdown_it import MarkdownIt

    lines = text.split("\n")
    headings: list[tuple[int, int, int, str]] = []  # start line, end line, level, text
    # block rules only: headings and their raw text need no inline parsing, whose emphasis and bracket rules
    # take tens of seconds on a few megabytes of crafted delimiters (`*a**` repeated: 27 s -> 0.5 s)
    tokens = MarkdownIt("commonmark").disable("inline").parse(text)
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.map is not None:
            inline = tokens[i + 1].content if i + 1 < len(tokens) else ""
            headings.append((token.map[0], token.map[1], int(token.tag[1:]), inline.strip()))
    cursor = 0
    for start, end, level, heading in headings:
        if start > cursor:
            yield 0, "\n".join(lines[cursor:start])
        yield level, heading
        cursor = end
    if cursor < len(lines):
        yield 0, "\n".join(lines[cursor:])


_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head", "nav", "footer", "form"})
_BLOCKS = frozenset({"p", "div", "li", "ul", "ol", "pre", "blockquote", "table", "tr", "section", "article",
                     "br", "hr", "dd", "dt", "figcaption", "main", "header", "aside"})


# what documentation generators put in a permalink to a heading or a definition (Sphinx and MkDocs "¶",
# "#", "§", a link symbol): a link inside the page whose whole text is one of these is not content
_PERMALINK = re.compile(r"[¶#§🔗]?")


def _permalink(tag: Any) -> bool:
    href = tag.get("href")
    return (tag.name == "a" and isinstance(href, str) and href.startswith("#")
            and _PERMALINK.fullmatch(tag.get_text(strip=True)) is not None)


def _html_blocks(text: str) -> tuple[str | None, list[Block]]:
    """HTML -> (its <title>, blocks): headings h1-h6 open sections; scripts, styles and navigation dropped,
    and the permalinks documentation generators add to headings and definitions ("¶")."""
    from bs4 import BeautifulSoup
    from bs4.element import Comment, NavigableString, Tag

    soup = BeautifulSoup(text, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    blocks: list[Block] = []
    body: list[str] = []

    def flush() -> None:
        joined = re.sub(r"[ \t]+", " ", "".join(body))
        joined = re.sub(r"\n\s*\n\s*", "\n\n", joined).strip()
        if joined:
            blocks.append((0, joined))
        body.clear()

    def walk(root: Tag) -> None:
        """Depth first with a stack of its own: a document nested 50,000 elements deep (it parses) must not
        exhaust Python's recursion limit."""
        # (children left to visit, the newline to add once they are done)
        stack: list[tuple[Iterator[Any], str]] = [(iter(root.children), "")]
        while stack:
            children, closing = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                body.append(closing)
                continue
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                body.append(str(child))
            elif isinstance(child, Tag):
                if child.name in _SKIP or _permalink(child):
                    continue
                if child.name in _HEADINGS:
                    flush()
                    for link in [a for a in child.find_all("a") if _permalink(a)]:
                        link.decompose()
                    blocks.append((_HEADINGS[child.name], child.get_text(" ", strip=True)))
                    continue
                block = child.name in _BLOCKS
                if block:
                    body.append("\n\n" if child.name not in ("li", "br", "tr") else "\n")
                # list items and rows: one line each
                stack.append((iter(child.children), "\n" if block and child.name not in ("li", "br", "tr") else ""))

    walk(soup.body if soup.body is not None else soup)
    flush()
    return title, blocks


def _sections_of(blocks: list[Block]) -> tuple[str | None, list[tuple[str, str]]]:
    """Blocks -> (the first level-1 heading, [(heading path, text)])."""
    path: list[tuple[int, str]] = []
    out: list[tuple[str, list[str]]] = [("", [])]
    first_h1 = None
    for level, text in blocks:
        if level == 0:
            out[-1][1].append(text)
            continue
        if level == 1 and first_h1 is None:
            first_h1 = text
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, text))
        out.append((" > ".join(h for _, h in path), [text]))  # a section's text opens with its heading
    # a heading with nothing under it before the next one is no section of its own
    bodies = [(heading, parts) for heading, parts in out if "\n".join(parts[1 if heading else 0:]).strip()] or \
        [(heading, parts) for heading, parts in out if "\n".join(parts).strip()]  # only headings: keep them
    return first_h1, [(heading, "\n".join(parts).strip()) for heading, parts in bodies]


def parse(text: str, fmt: str, *, title: str | None, source: str, splitting: Splitting,
          metadata_key: str = "") -> Parsed:
    text = _check_text(text)
    html_title = None
    if fmt == "markdown":
        blocks = list(_markdown_blocks(text))
    elif fmt == "html":
        html_title, blocks = _html_blocks(text)
    else:
        blocks = [(0, text)]
    first_h1, raw = _sections_of(blocks)
    if not raw:
        raise DocumentError("the document has no text")
    name = (title or html_title or first_h1 or source.rsplit("/", 1)[-1]).strip()[:512] or source[:512]
    whole = "\n\n".join(body for _, body in raw)
    tokens = count_text(whole) if splitting.whole_tokens else 0
    if splitting.whole_tokens and tokens <= splitting.whole_tokens:
        # a short document is one chunk: an answer, an entry, a note is retrieved whole or not at all
        sections: tuple[Section, ...] = (Section(raw[0][0] if len(raw) == 1 else "", whole, tokens,
                                                 (Chunk(whole, tokens),)),)
    else:
        sections = tuple(s for heading, body in raw for s in _split_section(heading, body, splitting))
    return Parsed(title=name, format=fmt, content_hash=content_hash(text, fmt, name, metadata_key, splitting.tag),
                  tokens=sum(s.tokens for s in sections), sections=sections)


# -- chunks --------------------------------------------------------------------------------------
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def _units(text: str, limit: int, overlap: int = 0) -> Iterator[tuple[str, int]]:
    """Paragraphs, and sentences of paragraphs over ``limit`` tokens, and token slices of sentences over it
    (overlapping by ``overlap`` tokens): pieces that each fit in a chunk."""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        n = count_text(paragraph)
        if n <= limit:
            yield paragraph, n
            continue
        for sentence in _SENTENCE.split(paragraph):
            m = count_text(sentence)
            if m <= limit:
                yield sentence, m
                continue
            ids = encoding().encode_ordinary(sentence)
            step = max(limit - overlap, 1)
            for start in range(0, max(len(ids) - overlap, 1), step):
                piece = encoding().decode(ids[start:start + limit])
                yield piece, count_text(piece)


def pack(units: list[tuple[str, int]], limit: int, overlap: int, sep: str, *,
         exact: bool = False) -> list[tuple[str, int]]:
    """Greedy: units in order into pieces of at most ``limit`` tokens; each new piece starts with the last
    units of the one before, up to ``overlap`` tokens of them.

    A piece's tokens are counted exactly (``count_text`` of the joined text), but only where it matters: the
    sum of the units' counts and the separators' is an upper bound of the joined text's count (joining can
    merge a unit's last token with the separator, never split one), so while that sum is within the limit
    the unit fits without counting; past it, the joined text is counted. Counting every candidate piece
    again (``exact``, what a piece falls back to where the bound did not hold) is quadratic in the units of
    a piece: 259 KB of prose took 1.37 s of CPU that way, 0.46 s this way."""
    pieces: list[tuple[str, int]] = []
    current: list[tuple[str, int]] = []
    sep_tokens = count_text(sep)

    def size(items: list[tuple[str, int]]) -> int:
        return count_text(sep.join(t for t, _ in items)) if items else 0

    def fits(items: list[tuple[str, int]]) -> bool:
        bound = sum(n for _, n in items) + sep_tokens * (len(items) - 1)
        return (not exact and bound <= limit) or size(items) <= limit

    def close(items: list[tuple[str, int]]) -> None:
        n = size(items)
        if n <= limit or len(items) == 1 or exact:
            pieces.append((sep.join(t for t, _ in items), n))
        else:  # the bound did not hold for these units: cut them counting every candidate
            pieces.extend(pack(items, limit, 0, sep, exact=True))

    for unit in units:
        if current and not fits([*current, unit]):
            close(current)
            carried: list[tuple[str, int]] = []
            for prev in reversed(current):
                if sum(n for _, n in carried) + prev[1] > overlap:
                    break
                carried.insert(0, prev)
            current = carried if size([*carried, unit]) <= limit else []
        current.append(unit)
    if current:
        close(current)
    return pieces


def _split_section(heading: str, body: str, splitting: Splitting) -> Iterator[Section]:
    """One section, or several of about ``section_tokens`` when it has no headings or is too long; each
    with its chunks."""
    units = list(_units(body, splitting.chunk_tokens, splitting.chunk_overlap))
    total = count_text(body)
    parts = [(body, total)] if total <= splitting.section_tokens * 1.5 else \
        pack(units, splitting.section_tokens, 0, "\n\n")
    for i, (text, tokens) in enumerate(parts):
        chunk_units = units if len(parts) == 1 else list(_units(text, splitting.chunk_tokens, splitting.chunk_overlap))
        chunks = tuple(Chunk(t, n) for t, n in pack(chunk_units, splitting.chunk_tokens,
                                                     splitting.chunk_overlap, "\n\n"))
        label = heading if len(parts) == 1 or not heading else f"{heading} ({i + 1})"
        yield Section(label, text, tokens, chunks)

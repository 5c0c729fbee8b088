"""MediaWiki markup to plain prose (the bundled Wikipedia sample's calibration and evaluation
text, see quantizer/assets.py): templates, tables, references, tags and link syntax go; one
line per paragraph, list item or heading remains."""

from __future__ import annotations

import html
import re

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_DROP_TAGS = "ref|references|math|chem|ce|gallery|source|syntaxhighlight|timeline|imagemap|score"
_DROP = re.compile(rf"<({_DROP_TAGS})\b[^>]*?(?:/>|>.*?</\1\s*>)", re.I | re.S)  # tag + content
_TAG = re.compile(r"</?[a-zA-Z][\w-]*(?:\s[^<>]*)?/?>")
_BRACES = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.M)
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # innermost [[...]]
_NO_LINK = re.compile(r"\s*(?i:file|image|category|media)\s*:|[a-z]{2,3}(?:-[a-z]+)?:")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"(=+)\s*(.*?)\s*\1")
_DROP_SECTIONS = set(
    "see also|references|external links|further reading|notes|bibliography|sources|citations"
    "|footnotes|notes and references|references and notes|works cited|other websites".split("|")
)


def _drop_braces(text: str) -> str:
    """Remove templates ``{{...}}`` and tables ``{| ... |}``, nested in any combination."""
    out, stack, pos, i = [], [], 0, 0
    while m := _BRACES.search(text, i):
        tok, i = m.group().strip(" \t:"), m.end()
        if tok == "|}" and stack[-1:] != ["|}"]:  # a "|}}" that closes a template
            i -= 1
        elif tok in ("{{", "{|"):
            if not stack:
                out.append(text[pos : m.start()])
            stack.append("}}" if tok == "{{" else "|}")
        elif tok in stack:
            while stack.pop() != tok:
                pass
            if not stack:
                pos = i
    if not stack:  # an unclosed opener swallows the rest
        out.append(text[pos:])
    return "".join(out)


def _link(m: re.Match[str]) -> str:
    target, _, label = m.group(1).partition("|")
    return "" if _NO_LINK.match(target) else (label or target.lstrip(":")).strip()


def strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: one line per paragraph, list item or heading."""
    text = _drop_braces(_DROP.sub("", _COMMENT.sub("", text)))
    while (new := _LINK.sub(_link, text)) != text:  # innermost first: captions may hold links
        text = new
    text = _EXT_LINK.sub(r"\1", text)
    text = re.sub(r"__[A-Z]+__|'{2,}|\[\[|\]\]|\{\{|\}\}", "", _TAG.sub("", text))
    lines: list[tuple[bool, str]] = []
    skip = 0  # level of a dropped section (references, links, ...) being skipped
    for raw in html.unescape(text).splitlines():
        line = " ".join(raw.split())
        if head := _HEADING.fullmatch(line):
            level, title = len(head[1]), head[2]
            if not skip or level <= skip:
                skip = level if title.lower() in _DROP_SECTIONS else 0
                if not skip and title:
                    lines.append((True, title))
            continue
        if skip or line.startswith(("|", "!")):  # dropped section or table-row residue
            continue
        if line and line[0] in "*#:;":
            line = line.lstrip("*#:; ")
            if len(line.split()) < 4:  # a bare link or term left from a list
                continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"\s+([,.;:!?)])", r"\1", re.sub(r"\(\s+", "(", line)).strip()
        if any(c.isalnum() for c in line):
            lines.append((False, line))
    # keep a heading only if a paragraph follows it
    nxt = [h for h, _ in lines[1:]] + [True]
    return "\n".join(t for (h, t), h2 in zip(lines, nxt, strict=True) if not h or not h2)

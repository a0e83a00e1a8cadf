"""Where keys are in a TOML text: tomllib gives values, not positions, so each problem found in a models file is
placed at its key's line here."""
import re


# A key as TOML spells it: bare, "basic" or 'literal'; a header or an assignment starts with dotted ones.
_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]")
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=")
# Outside strings: what starts a comment or a string (a multi-line string's three quotes before one).
_OPENER = re.compile(r"#|\"\"\"|'''|\"|'")
# From just after an opener to just after its close on the same line. A multi-line string closes at the end of a
# run of 3-5 quotes (TOML lets it end in one or two quotes of its own); a backslash escapes in basic strings only.
_CLOSE = {'"': re.compile(r'(?:[^"\\]|\\.)*"'), "'": re.compile(r"[^']*'"),
          '"""': re.compile(r'(?:[^"\\]|\\.|"{1,2}(?!"))*"{3,5}'), "'''": re.compile(r"(?:[^']|'{1,2}(?!'))*'{3,5}")}


def key_lines(text) -> dict:
    """Each key's line in a TOML text, by its path (("models", "qwen", "ctx"): 7); tomllib gives no positions."""
    lines, table, in_string = {}, (), None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:  # a multi-line string's lines hold no keys
            in_string = _open_string(line, in_string)
            continue
        header = _HEADER.match(line)
        assign = None if header else _ASSIGN.match(line)
        if header or assign:
            keys = tuple(key[1:-1] if key[0] in "\"'" else key for key in re.findall(_KEY, (header or assign)[1]))
            table, path = (keys, keys) if header else (table, table + keys)
            for end in range(1, len(path) + 1):
                lines.setdefault(path[:end], number)  # [models.a.limits] alone also places models.a
        in_string = _open_string(line)
    return lines


def _open_string(line, quote=None):
    """The quotes of the multi-line string still open at the end of line, given the one open at its start (None:
    none); quotes in a comment or a one-line string open none."""
    at = 0
    while True:
        if quote is None:
            opener = _OPENER.search(line, at)
            if opener is None or opener[0] == "#":
                return None
            quote, at = opener[0], opener.end()
        close = _CLOSE[quote].match(line, at)
        if close is None:  # it runs past the line: only a multi-line string may (tomllib has read the file)
            return quote if len(quote) == 3 else None
        quote, at = None, close.end()


class PlacedProblems(list):
    """The problems found so far in one file, each placed at the line of its key (else of the nearest table holding
    it) as (line, "FILE:LINE: dotted.key: message")."""

    def __init__(self, file, text):
        super().__init__()
        self.file, self.lines = file, key_lines(text)

    def add(self, path, message):
        """Add a problem with the key at path (a tuple of keys)."""
        line = next((self.lines[path[:end]] for end in range(len(path), 0, -1) if path[:end] in self.lines), 1)
        dotted = ".".join(part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else f'"{part}"' for part in path)
        self.append((line, f"{self.file}:{line}: {dotted}: {message}"))

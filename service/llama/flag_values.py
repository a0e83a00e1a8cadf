"""The values of llama-server's flags (flags.py): readers that turn a flag's text into the value CommonParams takes,
each with a hint of what it looks like for messages, and the plain-data stand-ins for xllamacpp's objects.

A reader raises ValueError (OSError for a file) saying what is wrong; it never imports xllamacpp.
"""
import json
import math
import os
from typing import NamedTuple, Optional

LORA = "CommonAdapterLoraInfo"  # xllamacpp's class of one LoRA adapter


class Native(NamedTuple):
    """An xllamacpp object named by its path: an enum member, or a class called with args when applied."""
    path: str
    args: Optional[tuple] = None


class Bit(int):
    """One bit of a bit-set field: a flag's bit adds to those other flags set (they are ORed together)."""


class Padded(NamedTuple):
    """A list that fills a fixed-length field, the rest zeros (tensor_split has one entry per possible device)."""
    values: tuple


def parser(hint, convert):
    """A value parser: text -> value, with what the value looks like, for messages."""
    def parse(text):
        return convert(text)
    parse.hint = hint
    return parse


def hinted(hint):
    """A decorator that makes a converter a parser with this hint."""
    return lambda convert: parser(hint, convert)


def integer(low=-2 ** 31, high=2 ** 31 - 1, zero_ok=True):
    """A parser of a whole number in low..high (not 0 unless zero_ok)."""
    hint = f"{low}..{high}" if high < 2 ** 31 - 1 else f"N >= {low}" if low > -2 ** 31 else "N"

    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
        if not low <= value <= high or (value == 0 and not zero_ok):
            raise ValueError("out of range")
        return value
    return parser(hint + ("" if zero_ok else ", not 0"), convert)


@hinted("a number")
def number(text):
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def choice(words, values, enum=""):
    """One of words (values may take more spellings): its value, or with an enum that enum's member so named."""
    def convert(text):
        if text not in values:
            raise ValueError("not one of the known values")
        return Native(f"{enum}.{values[text]}") if enum else values[text]
    return parser("|".join(words.split()), convert)


def member(enum, prefix, words, aliases=None):
    """A member of an xllamacpp enum: prefix + WORD, or prefix + what aliases says."""
    names = {word: word.upper().replace("-", "_") for word in words.split()} | (aliases or {})
    return choice(words, {word: prefix + name for word, name in names.items()}, enum)


def comma_list(text):
    """The non-empty items of a comma-separated list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("empty")
    return items


@hinted("N >= 0")
def context_size(text):
    """--ctx-size: the context and the least context llama.cpp's fitting may leave."""
    size = integer(0)(text)  # 0: the model's whole context, which llama.cpp's fitting must then not shrink
    return size, None if size else 2 ** 31 - 1


@hinted("N")
def rope_scale(text):
    """--rope-scale: expands the context N times: the frequency scale is its inverse."""
    factor = number(text)
    if not factor:
        raise ValueError("not 0")
    return 1.0 / factor


@hinted("PATTERN=BUFFER,...")
def tensor_overrides(text):
    """--override-tensor: the buffer's name is known only to llama.cpp: apply checks it."""
    items = comma_list(text)
    if not all(pattern and buffer for pattern, _, buffer in (item.partition("=") for item in items)):
        raise ValueError("each item is PATTERN=BUFFER")
    return ",".join(items)


@hinted("FNAME:SCALE,...")
def lora_scaled(text):
    """--lora-scaled: adapters, each with its scale."""
    pairs = [item.rpartition(":") for item in comma_list(text)]  # the last colon: a Windows path has one of its own
    if not all(path for path, _, _ in pairs):
        raise ValueError("each item is FNAME:SCALE")
    return [Native(LORA, (path, number(scale))) for path, _, scale in pairs]


@hinted("a JSON object")
def template_kwargs(text):
    """--chat-template-kwargs: a JSON object."""
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    # llama.cpp keeps each value as compact JSON text
    return {key: json.dumps(value, separators=(",", ":"), ensure_ascii=False) for key, value in parsed.items()}


@hinted("FILE")
def file_text(text):
    """A file's text: llama.cpp reads the file while parsing, so a missing one is a bad value."""
    with open(text, encoding="utf-8") as file:
        return file.read()


@hinted("DIRECTORY")
def made_directory(text):
    """A folder, made (with its parents) if missing, ending in a separator: llama-server makes its slot save
    folder so, and the gateway's may have been deleted by hand since."""
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot make the directory: {error.strerror}") from None
    return directory(text)


def directory(text):
    """A folder that exists, ending in a separator."""
    if not os.path.isdir(text):
        raise ValueError("not a directory")
    return text if text.endswith(os.sep) else text + os.sep

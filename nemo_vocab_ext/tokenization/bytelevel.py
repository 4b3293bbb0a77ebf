"""GPT-2's byte alphabet (every byte a printable character, so that a byte-level BPE token is a string
without spaces), the way back from a token to its bytes, and bytes split into whole UTF-8 characters."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the 68 others are moved to
    U+0100.. so that every token is a printable string without spaces (space is ``Ġ``)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_latin1() -> dict[int, int]:
    """str.translate's table from GPT-2's byte alphabet to the Latin-1 character of each byte; the
    Latin-1 characters outside the alphabet go to one that Latin-1 cannot encode."""
    table = {ord(c): b for b, c in bytes_to_unicode().items()}
    return {**dict.fromkeys(range(256), 0xFFFF), **table}


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for; None when it holds a character outside the alphabet."""
    try:
        return token.translate(_unicode_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def to_byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def split_utf8(data: bytes) -> list[str | int]:
    """Split bytes into decodable text runs and stray bytes (a token may hold part of a character)."""
    out: list[str | int] = []
    rest = data
    while rest:
        try:
            out.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append(rest[: e.start].decode("utf-8"))
            out.append(rest[e.start])
            rest = rest[e.start + 1 :]
    return out

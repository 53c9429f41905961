"""What an account's email, name and password may be.

**Email: one canonical form on every path** (:func:`canonical_email`, used by registration,
sign-in and the admin bootstrap): the address as email-validator normalises it (surrounding
spaces dropped, the local part in Unicode NFC, the domain through IDNA so that upper case,
fullwidth and punycode spellings of one domain are one), then lower case. An address registered
in decomposed Unicode therefore signs in however it is typed.

**Registration refuses lookalike addresses** (:func:`check_email`):

- compatibility characters, i.e. anything NFKC would change (fullwidth a, U+FF41, ligatures,
  mathematical letters, superscripts): an address is written with the plain characters;
- mixed scripts: the local part, and separately the domain, must each be written in one script
  (Unicode Script property; Common and Inherited characters -- digits, punctuation, combining
  marks -- go with any script). The only mixtures allowed are those UTS #39's "highly
  restrictive" level allows: Latin with Han, Hiragana and Katakana (Japanese), with Han and
  Bopomofo (Chinese), with Han and Hangul (Korean). So ``paypal@example.com`` spelt with a
  Cyrillic a (U+0430) is refused, while ``иван@пример.рф`` and ``josé@bücher.de`` are
  accepted. (A local part wholly in another script, e.g. all-Cyrillic, is a different mailbox
  and is accepted.)

**Names** (:func:`check_name`) are NFC-normalised and may not hold control characters (Cc),
format characters (Cf: bidirectional overrides and isolates, zero-width spaces, BOM...),
surrogates (Cs) or line/paragraph separators (Zl, Zp). Zero-width joiner and non-joiner
(U+200D, U+200C) are the exception: Persian, Indic scripts and emoji sequences need them.

**Passwords** (:func:`check_password`) may not be only whitespace, nor one of the 30,000 most
common passwords (case-insensitive), the list the ``zxcvbn`` package ships.
"""

from __future__ import annotations

import ast
import importlib.util
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from confusable_homoglyphs import categories
from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic.networks import validate_email
from pydantic_core import CoreSchema, PydanticCustomError

#: Scripts that go with any other.
_ANY_SCRIPT = frozenset({"COMMON", "INHERITED"})
#: Mixtures UTS #39 (section 5.2) allows at its "highly restrictive" level.
_ALLOWED_MIXTURES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
#: Format characters some scripts and emoji sequences need.
_JOINERS = frozenset({"\u200c", "\u200d"})
_REFUSED_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class SchemaPattern:
    """``Annotated`` metadata adding a JSON Schema ``pattern`` (made by ``pattern_of`` when the
    document is generated) for the part of a rule a schema can state, so a schema-driven
    client does not send what the validators here refuse."""

    pattern_of: Callable[[], str]

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["pattern"] = self.pattern_of()
        return schema


def _char_class(codes: list[int]) -> str:
    """A regex character class body for ``codes``: BMP characters as ``\\uXXXX``, others
    literally (the forms both Python's ``re`` and ECMA-262 with the ``u`` flag read)."""

    def one(code: int) -> str:
        return f"\\u{code:04X}" if code <= 0xFFFF else chr(code)

    parts: list[str] = []
    start = prev = codes[0]
    for code in [*codes[1:], -1]:
        if code == prev + 1:
            prev = code
            continue
        parts.append(one(start) if start == prev else f"{one(start)}-{one(prev)}")
        start = prev = code
    return "".join(parts)


@cache
def name_pattern() -> str:
    """A name as a regex: no refused character (surrogates aside: JSON text has none) and
    something besides whitespace. Control, format and separator characters live in planes 0,
    1 and 14 only (the others hold ideographs and private use), so only those are scanned."""
    planes = (*range(0x20000), *range(0xE0000, 0xF0000))
    refused = [
        code
        for code in planes
        if unicodedata.category(chr(code)) in _REFUSED_IN_NAMES - {"Cs"}
        and chr(code) not in _JOINERS
    ]
    no = _char_class(refused)
    return f"^[^{no}]*[^\\s{no}][^{no}]*$"


def password_pattern() -> str:
    """A new password as a regex: something besides whitespace."""
    return "\\S"


def canonical_email(email: str) -> str:
    """The one form an address is stored and looked up in (see the module docstring).
    Something that is not a valid address is only stripped, NFC-normalised and lower-cased."""
    try:
        _, email = validate_email(email)
    except PydanticCustomError:
        email = email.strip()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", email).lower())


def scripts_of(text: str) -> set[str]:
    """The scripts ``text`` is written in, Common and Inherited left out."""
    return {categories.alias(ch) for ch in text} - _ANY_SCRIPT


def _one_script(text: str) -> bool:
    scripts = scripts_of(text)
    return len(scripts) <= 1 or any(scripts <= allowed for allowed in _ALLOWED_MIXTURES)


def check_email(email: str) -> str:
    """An address as email-validator returned it, refused if it is a lookalike."""
    if not unicodedata.is_normalized("NFKC", email):
        odd = next((ch for ch in email if unicodedata.normalize("NFKC", ch) != ch), email[0])
        raise PydanticCustomError(
            "email_lookalike",
            "The address contains {char} ({code}), a variant form of another character;"
            " write it with the plain character",
            {"char": odd, "code": f"U+{ord(odd):04X}"},
        )
    local, _, domain = email.rpartition("@")
    for part, text in (("local part", local), ("domain", domain)):
        if not _one_script(text):
            raise PydanticCustomError(
                "email_lookalike",
                "The address mixes scripts ({scripts}) in its {part}; each of the local part"
                " and the domain must be written in one script",
                {"scripts": ", ".join(sorted(s.title() for s in scripts_of(text))), "part": part},
            )
    return email


def check_name(name: str) -> str:
    """A display name, NFC-normalised, refused if it holds control or format characters."""
    for ch in name:
        if unicodedata.category(ch) in _REFUSED_IN_NAMES and ch not in _JOINERS:
            raise PydanticCustomError(
                "name_control_character",
                "The name contains the control or formatting character {code}; names may hold"
                " only visible characters and spaces",
                {"code": f"U+{ord(ch):04X}"},
            )
    return unicodedata.normalize("NFC", name)


@cache
def _common_passwords() -> str:
    """zxcvbn's 30,000 commonest passwords in lower case, each between newlines, for a
    substring test (under 0.1 ms a lookup; only new passwords are looked up).

    Taken from the one line of zxcvbn's generated ``frequency_lists.py`` that holds them
    (``"passwords": "123456,password,...".split(","),``) as one string, without running the
    module or importing the package: ``import zxcvbn`` builds the ranked dictionaries of all its
    lists, 14.5 MB that stayed in every web process that had checked one password; running the
    module alone (all five lists split into 90,000 strings, then freed) left 2.0 MB, this
    1.6 MB. Kept as one string (0.25 MB; a set of them took 3 MB)."""
    package = importlib.util.find_spec("zxcvbn")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("the zxcvbn package (its list of common passwords) is missing")
    path = Path(next(iter(package.submodule_search_locations))) / "frequency_lists.py"
    with path.open(encoding="utf-8") as source:
        for line in source:
            key, _, value = line.strip().partition(": ")
            if key == '"passwords"' and value.endswith('.split(","),'):
                listed = str(ast.literal_eval(value.removesuffix('.split(","),')))
                # The words hold no comma (the module splits at them): one newline each.
                return "\n" + listed.lower().replace(",", "\n") + "\n"
    raise RuntimeError(f"no list of common passwords in {path}")


def _is_common(candidate: str) -> bool:
    # No listed password holds a newline, so one in the candidate cannot match across two.
    return "\n" not in candidate and f"\n{candidate}\n" in _common_passwords()


def check_password(password: str) -> str:
    """A new password, refused if it is only whitespace or among the commonest ones."""
    if not password.strip():
        raise PydanticCustomError(
            "password_blank", "The password must hold something other than whitespace"
        )
    if _is_common(password.lower()) or _is_common(password.strip().lower()):
        raise PydanticCustomError(
            "password_common",
            "This password is one of the most common ones and is guessed first; choose another",
        )
    return password

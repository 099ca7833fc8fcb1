#!/usr/bin/env python3
"""Writes vectors.tsv: phone-number normalization cases with libphonenumber's verdict.

Requires Python 3.11 and phonenumbers==9.0.43 (PyPI; the pin is in
requirements.txt beside this file). phonenumbers is a port of Google's
libphonenumber that tracks its releases and metadata version for version, so
its verdict is libphonenumber's verdict for metadata 9.0.43.

    python3 -m venv /tmp/pn && /tmp/pn/bin/pip install -r tests/vectors/phone/requirements.txt
    /tmp/pn/bin/python tests/vectors/phone/generate.py

The output is deterministic: rerunning with the same phonenumbers version
rewrites the same bytes.

Columns of vectors.tsv (tab-separated, one header line, UTF-8, no quoting; no
field contains a tab or a newline, and no input has leading or trailing
whitespace):

  input           the raw address, as the engine's Normalizer::address() gets it
  default_region  the region the Normalizer is built with (for numbers without
                  a country code)
  expected        libphonenumber's verdict: parse(number, default_region), then,
                  if is_valid_number, format_number(E164); empty when the
                  number does not parse or is not valid, i.e. must be refused.
                  For `whatsapp:` inputs the verdict is taken on the part after
                  the prefix (that part is what the engine parses).
  kind            example      an example number in E.164 (`+CC NSN`)
                  national     an example number in national format, parsed
                               with its own region as default region
                  intl-prefix  an example number dialled from abroad: `00 CC …`
                               from GB (from FR for +44 numbers) and
                               `011 CC …` from US (from CA for US numbers)
                  whatsapp     `whatsapp:+E164`; the channel must be WHATSAPP
                               (every other kind is SMS)
                  noise        an example number with spaces, dashes, dots,
                               brackets, or an extension that must be dropped
                  invalid      a number libphonenumber does not accept (too
                               short, too long, wrong leading digits, unknown
                               country code, garbage); expected is empty
                  regression   numbers named in the issue that asked for this
  region          libphonenumber's region_code_for_number of the expected number
                  ("001" for non-geographic entities); empty when refused
  number_type     libphonenumber's number_type of the expected number
                  (FIXED_LINE, MOBILE, ...); empty when refused
  source          where the case comes from: `GB/FIXED_LINE` (the example number
                  of that region and type; several types joined with `+` when
                  they share one example), `001:800/TOLL_FREE` for a
                  non-geographic entity, then `/variant` for derived cases
"""

from __future__ import annotations

import sys
from pathlib import Path

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberFormat, PhoneNumberType

PINNED = "9.0.43"
OUT = Path(__file__).resolve().parent / "vectors.tsv"
COLUMNS = ["input", "default_region", "expected", "kind", "region", "number_type", "source"]

# Every PhoneNumberType but UNKNOWN, in enum order (the first type of a shared
# example number is the one named first in `source`).
TYPES = sorted(
    (value, name)
    for name, value in vars(PhoneNumberType).items()
    if name.isupper() and name != "UNKNOWN"
)
TYPE_NAMES = {value: name for name, value in vars(PhoneNumberType).items() if name.isupper()}


def verdict(text: str, default_region: str) -> tuple[str, str, str]:
    """libphonenumber's (E.164, region, number type) for `text`, or three empties."""
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        return "", "", ""
    if not phonenumbers.is_valid_number(number):
        return "", "", ""
    return (
        phonenumbers.format_number(number, PhoneNumberFormat.E164),
        phonenumbers.region_code_for_number(number) or "",
        TYPE_NAMES[phonenumbers.number_type(number)],
    )


class Rows:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], list[str]] = {}

    def add(self, kind: str, text: str, default_region: str, source: str) -> None:
        assert text == text.strip() and "\t" not in text and "\n" not in text, text
        key = (kind, text, default_region)
        if key in self.rows:
            return  # the first source that produced a case names it
        parsed = text.split(":", 1)[1] if kind == "whatsapp" else text
        expected, region, number_type = verdict(parsed, default_region)
        if kind == "invalid":
            assert expected == "", (text, default_region, expected)
        self.rows[key] = [text, default_region, expected, kind, region, number_type, source]


def examples() -> list[tuple[str, phonenumbers.PhoneNumber]]:
    """(source, number) for every example number of every region, type and entity."""
    found: list[tuple[str, phonenumbers.PhoneNumber]] = []

    def collect(prefix: str, example_for) -> None:
        by_number: dict[str, tuple[list[str], phonenumbers.PhoneNumber]] = {}
        for value, name in TYPES:
            number = example_for(value)
            if number is None:
                continue
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            by_number.setdefault(e164, ([], number))[0].append(name)
        for e164, (names, number) in sorted(by_number.items()):
            if not phonenumbers.is_valid_number(number):
                raise SystemExit(f"example number {e164} of {prefix} is not valid")
            found.append((f"{prefix}/{'+'.join(names)}", number))

    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        collect(region, lambda t, r=region: phonenumbers.example_number_for_type(r, t))
    for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        meta = PhoneMetadata.metadata_for_nongeo_region(code)
        # The entity API gives one example; the per-type examples are in its metadata.
        def example_for(t, code=code, meta=meta):
            desc = phonenumbers.phonenumberutil._number_desc_by_type(meta, t)
            if desc is None or desc.example_number is None:
                return None
            return phonenumbers.parse(f"+{code}{desc.example_number}", None)
        collect(f"001:{code}", example_for)
        assert phonenumbers.example_number_for_non_geo_entity(code) is not None, code
    return found


def international_groups(number: phonenumbers.PhoneNumber) -> tuple[str, list[str]]:
    """`+44 121 234 5678` → ("44", ["121", "234", "5678"])."""
    text = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
    head, *groups = text.split(" ")
    assert head == f"+{number.country_code}", text
    return head[1:], groups


def add_example_cases(rows: Rows, source: str, number: phonenumbers.PhoneNumber) -> None:
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    region = source.split("/")[0]
    geographic = not region.startswith("001:")
    code, groups = international_groups(number)

    # E.164 with the engine's default configuration (US), and with the number's
    # own region as default region.
    rows.add("example", e164, "US", source)
    if geographic:
        rows.add("example", e164, region, source)
        rows.add(
            "national",
            phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL),
            region,
            f"{source}/national",
        )

    # Dialled from abroad.
    from_00 = "FR" if code == "44" else "GB"
    rows.add("intl-prefix", " ".join(["00", code, *groups]), from_00, f"{source}/00")
    rows.add("intl-prefix", f"00{e164[1:]}", from_00, f"{source}/00-compact")
    from_011 = "CA" if region == "US" else "US"
    rows.add("intl-prefix", " ".join(["011", code, *groups]), from_011, f"{source}/011")

    rows.add("whatsapp", f"whatsapp:{e164}", "US", f"{source}/whatsapp")

    spaced = " ".join([f"+{code}", *groups])
    rows.add("noise", spaced, "US", f"{source}/spaces")
    rows.add("noise", "-".join([f"+{code}", *groups]), "US", f"{source}/dashes")
    rows.add("noise", ".".join([f"+{code}", *groups]), "US", f"{source}/dots")
    if len(groups) > 1:
        bracketed = f"+{code} ({groups[0]}) {'-'.join(groups[1:])}"
        rows.add("noise", bracketed, "US", f"{source}/brackets")
    rows.add("noise", f"{spaced} ext. 123", "US", f"{source}/ext")
    rows.add("noise", f"{spaced} x123", "US", f"{source}/x")
    rows.add("noise", f"{e164};ext=123", "US", f"{source}/rfc3966-ext")


def invalid_candidates(number: phonenumbers.PhoneNumber, meta) -> list[tuple[str, str]]:
    """(variant, E.164-like text) that libphonenumber refuses, derived from `number`."""
    code = number.country_code
    nsn = phonenumbers.national_significant_number(number)
    lengths = sorted(meta.general_desc.possible_length)
    found = []

    short = nsn[: max(lengths[0] - 1, 1)]
    found.append(("too-short", f"+{code}{short}"))

    long = nsn + "1" * (lengths[-1] + 1 - len(nsn))
    found.append(("too-long", f"+{code}{long}"))

    # Same length, other leading digit: the first one libphonenumber refuses.
    for digit in "0123456789":
        if digit == nsn[0]:
            continue
        text = f"+{code}{digit}{nsn[1:]}"
        if verdict(text, "US")[0] == "":
            found.append(("wrong-prefix", text))
            break
    return [(variant, text) for variant, text in found if verdict(text, "US")[0] == ""]


def add_invalid_cases(rows: Rows, found: list[tuple[str, phonenumbers.PhoneNumber]]) -> None:
    seen_prefix: set[str] = set()
    for source, number in found:
        prefix = source.split("/")[0]
        if prefix in seen_prefix:
            continue  # one set of invalid numbers per region or entity
        seen_prefix.add(prefix)
        if prefix.startswith("001:"):
            meta = PhoneMetadata.metadata_for_nongeo_region(number.country_code)
        else:
            meta = PhoneMetadata.metadata_for_region(prefix)
        for variant, text in invalid_candidates(number, meta):
            rows.add("invalid", text, "US", f"{source}/{variant}")

    for text, default_region, variant in [
        ("not a number", "US", "garbage"),
        ("+999 123456789", "US", "unknown-country-code"),
        ("+1 555", "US", "too-short"),
        ("12", "US", "too-short"),
        ("+", "US", "plus-only"),
        ("+1 415 555 01000000000", "US", "too-long"),
    ]:
        rows.add("invalid", text, default_region, f"literal/{variant}")


def add_regression_cases(rows: Rows) -> None:
    for text in [
        "+5511961234567",
        "+441212345678",
        "+33123456789",
        "+821020000000",
        "+60123456789",
        "+1 (415) 555-0100",
        "+44 20.7946.0018",
    ]:
        for default_region in ["US", "GB", "FR", "BR", "DE", "IN", "RU"]:
            rows.add("regression", text, default_region, "issue")


def main() -> None:
    if phonenumbers.__version__ != PINNED:
        sys.exit(f"phonenumbers {phonenumbers.__version__} installed; these vectors pin {PINNED}")
    rows = Rows()
    found = examples()
    for source, number in found:
        add_example_cases(rows, source, number)
    add_invalid_cases(rows, found)
    add_regression_cases(rows)

    ordered = sorted(rows.rows.values(), key=lambda r: (r[3], r[6], r[0], r[1]))
    with OUT.open("w", encoding="utf-8", newline="\n") as out:
        out.write("\t".join(COLUMNS) + "\n")
        for row in ordered:
            out.write("\t".join(row) + "\n")

    counts: dict[str, list[int]] = {}
    for row in ordered:
        c = counts.setdefault(row[3], [0, 0])
        c[0] += 1
        c[1] += row[2] == ""
    print(f"wrote {len(ordered)} rows to {OUT.name} (phonenumbers {phonenumbers.__version__})")
    for kind, (total, refused) in sorted(counts.items()):
        print(f"  {kind:12} {total:6} rows, {refused:5} refused")


if __name__ == "__main__":
    main()

"""PII scrubbing: each type replaced by its placeholder and counted; near misses left alone."""

from __future__ import annotations

import pytest

from services.ingest.pipeline.pii import PiiScrubber, iban_ok, luhn_ok


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("jane.doe+tax@example.co.uk", "email"),
        ("(555) 123-4567", "phone"),
        ("555.123.4567", "phone"),
        ("+1 555 123 4567", "phone"),
        ("+44 20 7946 0958", "phone"),
        ("123-45-6789", "ssn"),
        ("4111 1111 1111 1111", "card"),
        ("5500-0000-0000-0004", "card"),
        ("378282246310005", "card"),
        ("GB82 WEST 1234 5698 7654 32", "iban"),
        ("DE89370400440532013000", "iban"),
        ("192.168.1.254", "ip"),
        ("10.0.0.1", "ip"),
        ("2001:db8::8a2e:370:7334", "ip"),
        ("fe80:0:0:0:202:b3ff:fe1e:8329", "ip"),
    ],
)
def test_each_pii_type_is_replaced_and_counted(value, kind):
    scrubber = PiiScrubber()
    out = scrubber.scrub(f"Please note {value}. Thanks")
    assert out == f"Please note [{kind.upper()}]. Thanks"
    assert scrubber.counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "IBAN GB82 WEST 1234 5698 7654 33 fails mod 97",
        "dated 2024-01-15 at 10:30:00",
        "revenue $1,234,567.89 up 4.5% in 2023",
        "version 1.2.3 of the model; std::vector<int> and a::b",
        "an SSN-like 000-12-3456 is invalid",
        "order no. 12345",
        "999.1.1.1 is not an address",
    ],
)
def test_near_misses_are_left_alone(text):
    scrubber = PiiScrubber()
    assert scrubber.scrub(text) == text
    assert not scrubber.counts


def test_several_kinds_in_one_text_and_unicode_offsets():
    scrubber = PiiScrubber()
    out = scrubber.scrub("Ünïcode — jane@ex.com, SSN 123-45-6789 4111 1111 1111 1111, 8.8.8.8")
    assert out == "Ünïcode — [EMAIL], SSN [SSN] [CARD], [IP]"
    assert scrubber.counts == {"email": 1, "ssn": 1, "card": 1, "ip": 1}


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_hostile_input_is_linear_time():
    scrubber = PiiScrubber()
    # Long runs that tempt backtracking engines: must return (RE2 candidates, bounded checks).
    hostile = (
        "1-" * 50_000,
        "a@" * 50_000,
        "1." * 50_000,
        "A1" * 50_000,
        ":" * 100_000,
        "1111 " * 20_000,
        "(555) " * 20_000,
        "GB82 " * 20_000,
    )
    for text in hostile:
        assert isinstance(scrubber.scrub(text), str)


def test_a_batch_scrubs_alike_in_ascii_and_in_unicode():
    """Chunks of plain ASCII take a faster path (one encode); a single non-ASCII text in the
    batch takes the other. Both give the same result, text by text."""
    texts = ["mail bob@example.com now", "nothing here", "card 4111 1111 1111 1111 ok"]
    scrubber = PiiScrubber()
    ascii_out = scrubber.scrub_many(texts)
    assert ascii_out == ["mail [EMAIL] now", "nothing here", "card [CARD] ok"]
    mixed = PiiScrubber().scrub_many([*texts, "café ☕ ip 10.1.2.3 — ssn 123-45-6789"])
    assert mixed[:3] == ascii_out and mixed[3] == "café ☕ ip [IP] — ssn [SSN]"
    assert PiiScrubber().scrub_changes(["a", "b@x.io z"]) == {1: "[EMAIL] z"}
    assert dict(scrubber.counts) == {"email": 1, "card": 1}

"""Record validation: role order, empty turns, prompt/answer length bounds, error text in
answers. Each check returns the reason a record is rejected, or None."""

from __future__ import annotations

import bisect
import itertools

import re2

# Text that means the "answer" is a failure, not an answer: tracebacks, refusals, API errors.
# RE2: linear time whatever the input, and one pass for every alternative.
_ERROR_PATTERN = (
    r"(?i)Traceback \(most recent call last\)"
    r"|I'?m sorry,? (?:but )?I (?:cannot|can'?t|am unable|'m unable)"
    r"|I apologi[sz]e,? but I (?:cannot|can'?t)"
    r"|As an AI language model"
    r"|openai\.(?:error|APIError|RateLimitError)"
    r"|Rate ?limit (?:reached|exceeded)"
    r"|insufficient_quota|context_length_exceeded|invalid_request_error"
    r"|Internal Server Error|Service Unavailable|Bad Gateway|Gateway Timeout"
    r"|Error code: [45]\d\d"
    r'|"error":\s*\{'
)
ERROR_TEXT = re2.compile(_ERROR_PATTERN)
# The same on bytes, for ASCII text: no conversion of offsets between bytes and characters.
_ERROR_BYTES = re2.compile(_ERROR_PATTERN.encode())


def role_order_error(messages: list[dict[str, str]]) -> str | None:
    """Optional leading system turn, then user/assistant alternating, ending on assistant."""
    if not messages:
        return "no messages"
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    if not turns:
        return "no user/assistant turns"
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"invalid role order: turn {i + start} is {message['role']}, expected {expected}"
    if turns[-1]["role"] != "assistant":
        return "invalid role order: the last turn is not an assistant answer"
    return None


def empty_turn_error(messages: list[dict[str, str]]) -> str | None:
    for i, message in enumerate(messages):
        if not message["content"].strip():
            return f"empty turn {i} ({message['role']})"
    return None


def error_text(answer: str) -> str | None:
    """The error-looking fragment of an answer, if there is one."""
    match = ERROR_TEXT.search(answer)
    return match.group(0)[:80] if match else None


def error_texts(answers: list[str]) -> dict[int, str]:
    """For many answers at once (one RE2 scan): index → the first error-looking fragment."""
    if not answers:
        return {}
    starts = list(itertools.accumulate((len(a) + 1 for a in answers[:-1]), initial=0))
    found: dict[int, str] = {}
    joined = "\x00".join(answers)
    # No pattern matches NUL, so no match spans two answers.
    if joined.isascii():
        for match in _ERROR_BYTES.finditer(joined.encode("ascii")):
            i = bisect.bisect_right(starts, match.start()) - 1
            found.setdefault(i, match.group(0)[:80].decode("ascii"))
        return found
    for match in ERROR_TEXT.finditer(joined):
        i = bisect.bisect_right(starts, match.start()) - 1
        found.setdefault(i, match.group(0)[:80])
    return found

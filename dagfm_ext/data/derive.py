"""Fields derived from a raw column by a named function, kept by name in the schema so that raw
rows at inference are derived exactly as the training rows were (Avazu's ``hour``, YYMMDDHH,
gives an hour-of-day field and a weekday field)."""
from __future__ import annotations

import datetime
from typing import Callable, Dict, Tuple

__all__ = ["DERIVATIONS", "hour_of_day", "weekday"]


def _hour_parts(raw: str) -> datetime.datetime:
    if len(raw) != 8 or not raw.isdigit():
        raise ValueError(raw)
    return datetime.datetime(2000 + int(raw[:2]), int(raw[2:4]), int(raw[4:6]), int(raw[6:]))


def hour_of_day(raw: str) -> str:
    return "" if raw == "" else str(_hour_parts(raw).hour)


def weekday(raw: str) -> str:
    return "" if raw == "" else str(_hour_parts(raw).weekday())


# name -> (raw value -> token, raising ValueError on a malformed value; what a raw value looks like)
DERIVATIONS: Dict[str, Tuple[Callable[[str], str], str]] = {
    "hour_of_day": (hour_of_day, "YYMMDDHH"),
    "weekday": (weekday, "YYMMDDHH"),
}

"""Proto conversions on the check's path, built by hand for speed, against protobuf's own."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from usage_service.api import convert

ZONES = st.sampled_from(
    [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(-dt.timedelta(hours=8))]
)


@given(st.datetimes(timezones=st.none() | ZONES))
def test_a_timestamp_is_what_from_datetime_makes(when: dt.datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(when)
    assert convert.ts(when) == expected

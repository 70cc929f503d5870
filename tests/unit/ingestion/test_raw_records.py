"""A number no decimal can hold is bad JSON on both ingest paths, not an error nobody catches:
on the Kafka input such a record would be rewound and read again forever."""

from __future__ import annotations

import pytest

from billstream_ingestion import endpoints, raw_records
from billstream_runtime.errors import ApiError

OUT_OF_RANGE = (b'{"idempotency_key": "k", "customer": "c", "meter": "m",'
                b' "quantity": 1e99999999999999999999}')


def test_a_kafka_record_with_it_is_rejected_as_invalid_json() -> None:
    decoded = raw_records.decode(OUT_OF_RANGE, [(raw_records.API_KEY_HEADER, b"sk_test_x")],
                                 64 * 1024)
    assert decoded.error is not None and decoded.error.code == "invalid_json"
    assert decoded.api_key == "sk_test_x"


def test_a_request_body_with_it_is_answered_invalid_json() -> None:
    with pytest.raises(ApiError) as raised:
        endpoints._parse_json(OUT_OF_RANGE)
    assert raised.value.code == "invalid_json"

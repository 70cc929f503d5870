"""What "the same request" means to the Idempotency-Key layer (`hash_request`)."""

from __future__ import annotations

from billstream_runtime.idempotency import hash_request

PATH = "/v1/usage/events"
BODY = b'{"quantity": 1}'


def binary(ce_id: bytes = b"i1", **over: bytes) -> list[tuple[bytes, bytes]]:
    headers = {b"authorization": b"Bearer sk_test_x", b"idempotency-key": b"k-1",
               b"content-type": b"application/json", b"ce-specversion": b"1.0",
               b"ce-id": ce_id, b"ce-source": b"//acme", b"ce-type": b"api_calls",
               b"ce-subject": b"acme-1"}
    headers.update({name.replace("_", "-").encode(): value for name, value in over.items()})
    return list(headers.items())


def test_a_request_without_ce_headers_hashes_as_before_the_upgrade():
    # idempotency keys stored before ce-* headers counted must still match a retry: these
    # digests are sha256(method NUL path NUL query NUL body), the only form there was
    assert hash_request("POST", PATH, b"", BODY) == (
        "4446fab2a5858ee4077b955436a0976789dfa452ec6c49406c48f141d5fdca13")
    assert hash_request("POST", "/v1/notes", b"a=1", b"") == (
        "4fb1bdd90a4f6c7b70b59f9b139003342c04a7913b7c685ac62336c00b14ba92")
    other_headers = [(b"authorization", b"Bearer sk_test_x"), (b"idempotency-key", b"k-1"),
                     (b"content-type", b"text/plain"), (b"x-ce-id", b"i1")]
    assert hash_request("POST", PATH, b"", BODY, other_headers) == (
        "4446fab2a5858ee4077b955436a0976789dfa452ec6c49406c48f141d5fdca13")


def test_binary_mode_cloudevents_differ_by_their_ce_headers():
    first = hash_request("POST", PATH, b"", BODY, binary(b"i1"))
    assert first != hash_request("POST", PATH, b"", BODY, binary(b"i2"))
    assert first != hash_request("POST", PATH, b"", BODY, binary(ce_time=b"2026-01-01T00:00:00Z"))
    assert first != hash_request("POST", PATH, b"", BODY)  # nor like the body alone
    # with ce-* headers, Content-Type is the event's datacontenttype: it counts too
    assert first != hash_request("POST", PATH, b"", BODY,
                                 binary(content_type=b"application/json; charset=utf-8"))
    without_type = [h for h in binary() if h[0] != b"content-type"]
    assert first != hash_request("POST", PATH, b"", BODY, without_type)
    assert hash_request("POST", PATH, b"", BODY, without_type) != hash_request(
        "POST", PATH, b"", BODY, [*without_type, (b"content-type", b"")])


def test_an_exact_retry_hashes_the_same_whatever_the_header_order_and_name_case():
    first = hash_request("POST", PATH, b"", BODY, binary())
    reordered = [(name.upper(), value) for name, value in reversed(binary())]
    assert hash_request("POST", PATH, b"", BODY, reordered) == first
    # headers that are not ce-* or Content-Type do not count
    assert hash_request("POST", PATH, b"", BODY, [*binary(), (b"traceparent", b"00-x")]) == first
    # values count as sent
    assert hash_request("POST", PATH, b"", BODY, binary(ce_subject=b"acme%2D1")) != first

"""The fast lane's judge (``lane.take``): exactly the requests the shortcuts answer, whole
and alone in one chunk, become lane requests; anything else is aiohttp's, and a chunk that
is not exactly one whole message takes the connection out of the lane."""

from __future__ import annotations

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy.http.lane import NOT_ONE, ROUTER, LaneRequest, serialize, take

GET = b"GET /api/db/users/u1 HTTP/1.1\r\nHost: x\r\n\r\n"
QUERY_BODY = b'{"filter": {"a": 1}}'
QUERY = (
    b"POST /api/db/users/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(QUERY_BODY), QUERY_BODY)
)


def test_a_whole_get_by_id_is_the_lanes() -> None:
    req = take(GET + b"")
    assert isinstance(req, LaneRequest)
    assert (req.method, req.raw_path, req.body, req.content_length) == (
        "GET",
        "/api/db/users/u1",
        b"",
        None,
    )
    assert req.headers["host"] == "x"


def test_a_whole_query_is_the_lanes_with_its_body_and_media_type() -> None:
    req = take(QUERY)
    assert isinstance(req, LaneRequest)
    assert (req.method, req.raw_path, req.body) == ("POST", "/api/db/users/query", QUERY_BODY)
    assert (req.content_length, req.content_type) == (len(QUERY_BODY), "application/json")
    assert req.query_string == ""
    req["k"] = 1  # the per-request state the pipelines keep on a request
    assert req.get("k") == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/db/users/u1?fields=a HTTP/1.1\r\n\r\n",  # a query string
        b"GET /api/db/users/u%31 HTTP/1.1\r\n\r\n",  # a percent-escape
        b"GET /api/db/users/count HTTP/1.1\r\n\r\n",  # count, not an id
        b"GET /api/db/schema/users HTTP/1.1\r\n\r\n",  # a routed reserved name
        b"GET /api/db/migrations/m1 HTTP/1.1\r\n\r\n",
        b"GET /api/db/users HTTP/1.1\r\n\r\n",  # a listing
        b"GET /api/db/users/u1/x HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n\r\n",
        b"GET /api/db/users/u1 HTTP/1.0\r\n\r\n",  # HTTP/1.0
        b"GET /api/db/users/u1 HTTP/1.1\r\nConnection: close\r\n\r\n",  # closes after
        b"GET /api/db/users/u1 HTTP/1.1\r\nX-Transaction-Id: t1\r\n\r\n",  # a transaction
        b"GET /api/db/users/u1 HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n",
        b"GET /api/db/users/u1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # a GET with a body
        b"POST /api/db/users HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # a create
        b"POST /api/db/users/aggregate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/db/users/query HTTP/1.1\r\n\r\n",  # no Content-Length
        b"POST /api/db/users/query HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/db/users/query HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"PUT /api/db/users/u1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"DELETE /api/db/users/u1 HTTP/1.1\r\n\r\n",
        b"GET /api/db/users/u1 HTTP/1.1\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(70))
        + b"\r\n",
        b"POST /api/db/users/query HTTP/1.1\r\nContent-Length: 20000\r\n\r\n" + b" " * 20000,
    ],
)
def test_what_the_shortcuts_do_not_answer_is_the_routers(raw: bytes) -> None:
    assert take(raw) == ROUTER


@pytest.mark.parametrize(
    "raw",
    [
        GET[:20],  # partial headers
        QUERY[:-3],  # partial body
        GET + GET,  # pipelined
        GET + b"GET /api/db/users/u2",  # one whole, the next begun
        b"\x16\x03\x01\x02\x00",  # not HTTP
        # an upgrade: what follows is not HTTP
        b"GET /api/db/users/u1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"GET /api/db/users/u1 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /api/db/users/u1 HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /api/db/users/u1 HTTP/1.1\nHost: x\n\n\x00",
    ],
)
def test_anything_but_one_whole_message_leaves_the_lane(raw: bytes) -> None:
    assert take(raw) is NOT_ONE


@given(st.binary(max_size=300))
def test_take_never_raises(raw: bytes) -> None:
    verdict = take(raw)
    assert verdict in (NOT_ONE, ROUTER) or isinstance(verdict, LaneRequest)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=40))
def test_any_plain_id_is_the_lanes(doc_id: str) -> None:
    req = take(b"GET /api/db/c/%s HTTP/1.1\r\n\r\n" % doc_id.encode())
    if doc_id == "count":
        assert req == ROUTER
    else:
        assert isinstance(req, LaneRequest) and req.raw_path == f"/api/db/c/{doc_id}"


def test_serialize_writes_what_aiohttp_writes() -> None:
    response = web.Response(
        body=b'{"a":1}', status=404, content_type="application/json", headers={"ETag": '"3"'}
    )
    response.headers["X-Request-Id"] = "r1"
    head, _, body = serialize(response).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 404 Not Found"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Content-Type"] == "application/json"
    assert fields["ETag"] == '"3"' and fields["X-Request-Id"] == "r1"
    assert fields["Content-Length"] == "7" and body == b'{"a":1}'
    assert fields["Server"].startswith("Python/3.") and "Date" in fields


def test_serialize_refuses_a_header_with_a_line_break() -> None:
    response = web.Response(body=b"{}")
    response.headers["X-Evil"] = "a\r\nSet-Cookie: b"
    with pytest.raises(ValueError, match="line break"):
        serialize(response)


def test_header_values_are_decoded_as_aiohttps_parser_decodes_them() -> None:
    raw = "GET /api/db/users/u1 HTTP/1.1\r\nX-Service: café\r\nX-Bad: \udcff\r\n\r\n"
    req = take(raw.encode("utf-8", "surrogateescape"))
    assert isinstance(req, LaneRequest)
    assert req.headers["x-service"] == "café"
    assert req.headers["x-bad"] == "\udcff"

"""Resource discovery: `GET /.well-known/core` in CoRE Link Format (RFC 6690).

Every route registered with link attributes is listed, e.g.
`</telemetry>;rt="corem.telemetry";ct="60 50",</sensors/t>;rt="temperature";obs`.  A query filters
on one attribute (§4.1): `?rt=temperature`, `?href=/sensors*` (a trailing `*` matches a prefix);
space-separated attribute values match if any value does.  Large answers go block-wise (Block2).
"""

from __future__ import annotations

from ..codec import Code, OptionNumber, encode_uint
from ..content_format import LINK_FORMAT
from .endpoint import Request
from .resources import Response, Router


def _link(path: str, attrs: dict[str, str | bool]) -> str:
    parts = [f"</{path}>"]
    for name, value in attrs.items():
        if value is True:
            parts.append(name)
        elif value is not False and value is not None:
            parts.append(f'{name}="{value}"' if not str(value).isdigit() else f"{name}={value}")
    return ";".join(parts)


#: the link attributes whose values are lists of space-separated values (RFC 6690 §3.1-§3.2, RFC 8288 §3.3)
LIST_ATTRIBUTES = frozenset({"rt", "if", "rel"})


def _matches(path: str, attrs: dict[str, str | bool], query: str) -> bool:
    name, _, want = query.partition("=")
    if name == "href":
        have = ["/" + path]
    elif name in attrs:
        value = attrs[name]
        # (RFC 6690 §4.1, §3.1: the relation-type attributes rt, if and rel hold lists of
        # space-separated values, each matched alone; any other value is matched whole)
        have = [""] if value is True else str(value).split() if name in LIST_ATTRIBUTES else [str(value)]
    else:
        return False
    if want.endswith("*"):
        return any(h.startswith(want[:-1]) for h in have)
    return want in have


def install(router: Router) -> None:
    """Serve `/.well-known/core` for everything `router` lists."""

    def core(req: Request, params: list[str]) -> Response:
        assert req.message is not None
        queries = req.message.uri_query
        links = [
            _link(path, attrs)
            for path, attrs in router.links()
            if not queries or _matches(path, attrs, queries[0])
        ]
        if queries and not links:
            return Response(Code.NOT_FOUND)  # §4.1: a filter that matches nothing
        return Response(Code.CONTENT, ",".join(links).encode(),
                        [(OptionNumber.CONTENT_FORMAT, encode_uint(LINK_FORMAT))])

    router.add(".well-known/core", {Code.GET: core})

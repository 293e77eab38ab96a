"""The control channel between the master and each worker: AMP over a socketpair.

Owns the commands both sides speak and how their values travel:
- master -> worker: `Apply` (runtime edits the master made: manager, health checks,
  state file, or a failover another worker saw), `Census` (the worker's counters,
  summed by the master when a page is read);
- worker -> master: `Ready` (it is about to serve; answered with the runtime state), `Report` (a failover or retry it made itself,
  for the master to apply and pass on), `AdminRequest` (a vhost route's admin page:
  the request, whole, for the master's admin to answer).
Edits travel as JSON; large values (a status page, a census) as `Blob`, split over
as many AMP values as they need (one AMP value holds at most 65,535 bytes).
"""

from __future__ import annotations

import json

from twisted.protocols import amp

from ..runtime.state import Change, Edit

_PIECE = 60000


class Blob(amp.Argument):
    """Bytes of any length: `name` holds the number of pieces, `name.0`... the pieces."""

    def toBox(self, name, strings, objects, proto):
        value = objects[str(name, "ascii")]
        pieces = [value[i:i + _PIECE] for i in range(0, len(value), _PIECE)] or [b""]
        strings[name] = str(len(pieces)).encode()
        for i, piece in enumerate(pieces):
            strings[b"%s.%d" % (name, i)] = piece

    def fromBox(self, name, strings, objects, proto):
        n = int(strings.pop(name))
        objects[str(name, "ascii")] = b"".join(strings.pop(b"%s.%d" % (name, i))
                                               for i in range(n))


class Json(Blob):
    """Any JSON value, as a Blob."""

    def toBox(self, name, strings, objects, proto):
        key = str(name, "ascii")
        objects = dict(objects)
        objects[key] = json.dumps(objects[key], separators=(",", ":")).encode()
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name, strings, objects, proto):
        super().fromBox(name, strings, objects, proto)
        key = str(name, "ascii")
        objects[key] = json.loads(objects[key])


class Channel(amp.AMP):
    """AMP without its log line per connection made and lost (one per worker start:
    the master logs the worker's start and end itself)."""

    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class Ready(amp.Command):
    """The worker is about to serve; the answer is the master's runtime state, which
    the worker applies before it accepts a connection."""
    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]
    response = [(b"edits", Json())]


class Apply(amp.Command):
    """Edits to apply as one batch, with the source and who of the original change."""
    arguments = [(b"edits", Json()), (b"source", amp.Unicode()), (b"who", amp.Unicode())]
    response = []
    errors = {ValueError: b"INVALID"}


class Report(amp.Command):
    """A worker's own failover or retry changes, for the master (and the others)."""
    arguments = [(b"edits", Json()), (b"source", amp.Unicode()), (b"who", amp.Unicode())]
    response = []
    requiresAnswer = False


class Census(amp.Command):
    arguments = []
    response = [(b"snapshot", Json())]


class AdminRequest(amp.Command):
    """A proxy listener's request for a route with `handler`, as raw HTTP/1.0 bytes."""
    arguments = [(b"handler", amp.Unicode()), (b"vhost", amp.Integer()),
                 (b"raw", Blob()), (b"peer", amp.Unicode()), (b"peer_port", amp.Integer()),
                 (b"host", amp.Unicode()), (b"host_port", amp.Integer()),
                 (b"secure", amp.Boolean())]
    response = [(b"answer", Blob())]


def edits_of(changes: list[Change]) -> list[list]:
    """Changes as the edits that make them again elsewhere (JSON-able rows)."""
    rows = []
    for c in changes:
        if c.field in ("add_member", "discover_member"):
            rows.append([c.balancer, None, c.field, c.new])
        else:
            rows.append([c.balancer, c.member, c.field, c.new])
    return rows


def edits_from_rows(rows: list[list]) -> list[Edit]:
    return [Edit(balancer=b, member=m, field=f, value=v) for b, m, f, v in rows]


def edits_of_edits(edits: list[Edit]) -> list[list]:
    return [[e.balancer, e.member, e.field, e.value] for e in edits]


def batches(rows: list[list]) -> list[list[list]]:
    """Members a batch adds first, then its other edits (which may name them)."""
    adds = [r for r in rows if r[2] in ("add_member", "discover_member")]
    rest = [r for r in rows if r[2] not in ("add_member", "discover_member")]
    return [b for b in (adds, rest) if b]

"""Writing to a TCP transport straight to its socket when nothing is queued.

Twisted's transport.write() queues the bytes, registers the socket for writability
with epoll, sends on the next reactor turn and unregisters again: two epoll_ctl calls
and a reactor turn per response. A proxy writes one small head (and often the whole
body) per request, so when the transport's buffer is empty we try send() at once and
hand only what the kernel did not take to transport.write(). Order is kept because
the direct path is only taken while nothing is buffered. Transports that are not
plain TCP connections (TLS, test transports) always use transport.write().
"""

from __future__ import annotations

from twisted.internet import tcp


def writer_for(transport):
    """A write(data) function for this transport."""
    if type(transport) is not tcp.Server and type(transport) is not tcp.Client:
        return transport.write
    sock = transport.socket
    queue = transport.write

    def write(data: bytes) -> None:
        t = transport
        if t._tempDataLen or t.offset < len(t.dataBuffer) or t.disconnecting \
                or not t.connected:
            queue(data)
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            queue(data)          # let Twisted see and report the error its own way
            return
        if sent < len(data):
            queue(data[sent:])

    return write

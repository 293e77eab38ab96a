"""A WebSocket echo backend (autobahn on Twisted), for the demo and the tests.

Every message comes back as it went (text or binary), pings are answered by autobahn,
and a close is answered with the same code and reason. `python -m twistproxy.wsecho
[PORT]` serves on 127.0.0.1 and prints the port.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol


class EchoProtocol(WebSocketServerProtocol):
    def onConnect(self, request):
        self.factory.connections += 1
        return None

    def onMessage(self, payload, isBinary):
        if payload == b"__close_me__":
            self.sendClose(4001, "asked to close")
            return
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.append((code, reason))


def factory() -> WebSocketServerFactory:
    f = WebSocketServerFactory()
    f.protocol = EchoProtocol
    f.connections = 0
    f.closed = []
    # echo whatever size arrives: the tests go to 16 MiB
    f.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0,
                         autoFragmentSize=65536, echoCloseCodeReason=True)
    f.noisy = False
    return f


def main(argv=None) -> None:
    import sys

    from twisted.internet import reactor
    args = sys.argv[1:] if argv is None else argv
    port = reactor.listenTCP(int(args[0]) if args else 0, factory(), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

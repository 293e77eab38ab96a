"""`python -m twistproxy.wsclient ws://HOST:PORT/PATH`: a line-at-a-time WebSocket client.

For trying the demo's WebSocket route with nothing but what `pip install .` installs:
each line read from stdin goes as a text message and each message that comes back is
printed. Plain ws:// only, standard library only; end input (Ctrl-D) to close.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import sys
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def connect(url: str):
    """The socket and a reader of it, after a 101 with the right Sec-WebSocket-Accept."""
    u = urlsplit(url)
    if u.scheme != "ws" or not u.hostname:
        raise SystemExit(f"{url}: only ws://HOST[:PORT]/PATH URLs")
    sock = socket.create_connection((u.hostname, u.port or 80), timeout=30)
    key = base64.b64encode(os.urandom(16))
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    reader = sock.makefile("rb")
    status = reader.readline().decode("latin-1").strip()
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status.split(" ")[1:2] != ["101"]:
        raise SystemExit(f"{url}: {status or 'connection closed'}")
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != accept:
        raise SystemExit(f"{url}: wrong Sec-WebSocket-Accept in the 101")
    return sock, reader


def send(sock: socket.socket, payload: bytes, opcode: int = 1) -> None:
    """One final frame, masked as a client must."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def receive(sock: socket.socket, reader) -> bytes | None:
    """The next whole message (fragments joined), or None when the server closes."""
    message = b""
    while True:
        head = reader.read(2)
        if len(head) < 2:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", reader.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", reader.read(8))[0]
        mask = reader.read(4) if head[1] & 0x80 else None
        data = reader.read(n)
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        if opcode == 8:
            return None
        if opcode == 9:
            send(sock, data, opcode=10)          # pong
            continue
        if opcode == 10:
            continue
        message += data
        if head[0] & 0x80:
            return message


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m twistproxy.wsclient ws://HOST:PORT/PATH", file=sys.stderr)
        return 2
    try:
        sock, reader = connect(args[0])
    except OSError as e:
        print(f"{args[0]}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"connected to {args[0]}: type a line, Ctrl-D to close", file=sys.stderr)
    for line in sys.stdin:
        send(sock, line.rstrip("\n").encode())
        answer = receive(sock, reader)
        if answer is None:
            print("the server closed the connection", file=sys.stderr)
            return 1
        print(answer.decode(errors="replace"), flush=True)
    send(sock, struct.pack("!H", 1000), opcode=8)
    receive(sock, reader)                        # the server's close
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

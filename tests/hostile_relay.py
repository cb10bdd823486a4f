"""A grid whose relay turns hostile on request: the test support for tests/test_outbound.py.

Run as ``python tests/hostile_relay.py HOME PORT``. It is the real grid (its service, app and relay),
except that before every chunk it carries, the relay reads ``HOME/mode`` and acts on it:
``honest``; ``flip-up``/``flip-down`` (flip the last byte of the first chunk past 600 bytes that the
scientist/node sends);
``replay-up``/``replay-down`` (send the first chunk after the TLS handshake a second time); ``misroute``
(every tunnel goes to another node: the direct node's port, so another real node answers). A fake, because a hostile relay is a fault
that honest code cannot cause.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

from voxgrid.nodes.http import server
from voxgrid.nodes.http.grid import GridService, create_grid_app
from voxgrid.nodes.http.relay import LinkStats, relay_protocol
from voxgrid.nodes.service.home import Home


class Tamper:
    def __init__(self, mode_file: Path):
        self.mode_file = mode_file
        self.seen: dict[str, int] = {}
        self.captured: dict[str, bytes] = {}

    def mode(self) -> str:
        return self.mode_file.read_text().strip() if self.mode_file.exists() else "honest"

    def __call__(self, direction: str, data: bytes) -> bytes:
        mode, offset = self.mode(), self.seen.get(direction, 0)
        self.seen[direction] = offset + len(data)
        if mode == f"flip-{direction}" and offset + len(data) > 600 and direction not in self.captured:
            self.captured[direction] = b"flipped"  # once per tunnel: the last byte, a record's auth tag
            return data[:-1] + bytes([data[-1] ^ 0x01])
        if mode == f"replay-{direction}" and offset > 0:
            if direction not in self.captured:
                self.captured[direction] = data
                return data
            return data + self.captured[direction]
        return data


def main(home_path: str, port: str) -> None:
    home = Home(home_path, "grid")
    service = GridService(home)
    mode = Tamper(home.path / "mode").mode
    relay, honest_connect = service.relay, service.relay._connect

    async def connect(protocol, authority, headers, rest):
        if mode() != "misroute":
            return await honest_connect(protocol, authority, headers, rest)
        other = urlsplit([i for i in service._registered() if i.connect == "direct"][0].url)
        caller, _ = relay._caller(headers, "proxy-authorization", "scientist", "owner")
        relay.tunnels[caller] += 1
        transport = protocol.take_over()
        node, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, other.hostname, other.port)
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        relay._splice(transport, (node, b""), LinkStats(node="impostor", peer="-"), caller, rest)

    relay._connect = connect
    service.relay.tamper = lambda: Tamper(home.path / "mode")  # offsets count per tunnel

    def listening(bound: int):
        server._write_run_file(home, f"https://127.0.0.1:{bound}")

    server._serve(create_grid_app(service), home, "127.0.0.1", int(port), listening, relay_protocol(service.relay))


if __name__ == "__main__":
    main(*sys.argv[1:])

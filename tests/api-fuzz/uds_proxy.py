#!/usr/bin/env python3
"""Loopback TCP to unix socket relay for fuzzing the handset API (test-only).

Usage: uds_proxy.py SOCKET PORTFILE

Listens on 127.0.0.1 on a free port (written to PORTFILE once listening) and relays each
connection byte for byte to the unix socket SOCKET, so an HTTP client that only speaks TCP
(schemathesis) can reach the daemon. Never listens beyond loopback.
"""

import asyncio
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main(sock_path, port_file):
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_unix_connection(sock_path)
        except OSError as e:
            print(f"uds_proxy: cannot connect to {sock_path}: {e}", file=sys.stderr)
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.rename(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""The etcd sidecar of scission's pods: plaintext on 127.0.0.1, mutual TLS to etcd.

    python deploy/etcd_tls_proxy.py --listen 127.0.0.1:2379 \\
        --upstream scission-etcd.scission.svc:2379 --cacert ca.crt --cert tls.crt --key tls.key
    python deploy/etcd_tls_proxy.py --probe 127.0.0.1:2379     # exit 0 when etcd answers

scission's etcd client has no TLS options yet, and etcd (deploy/k8s/etcd.yaml) accepts only
TLS clients holding a certificate its CA signed. This relays each local connection's bytes
to etcd over TLS (ALPN ``h2``, as gRPC needs) with the client certificate, so the gRPC
streams, including each lease keep-alive and watch, reach etcd unchanged. (``etcd grpc-proxy``
does not: a keep-alive stream that sends one request and half-closes, as python-etcd3's
``refresh_lease`` does, gets "context canceled" through it, and it keeps leases alive on
its own.) Only processes in the pod reach the listening port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host, int(port)


def client_context(cacert: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS to etcd: its certificate checked against ``cacert``, ours presented, HTTP/2."""
    context = ssl.create_default_context(cafile=cacert)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _relay(local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter,
                 upstream: tuple[str, int], context: ssl.SSLContext) -> None:
    try:
        remote_reader, remote_writer = await asyncio.open_connection(
            *upstream, ssl=context, server_hostname=upstream[0])
    except (OSError, ssl.SSLError) as exc:
        logger.warning("etcd %s:%d unreachable: %s", *upstream, exc)
        local_writer.close()
        return
    results = await asyncio.gather(_pipe(local_reader, remote_writer),
                                   _pipe(remote_reader, local_writer), return_exceptions=True)
    for result in results:  # a reset connection ends the relay; anything else is a bug
        if isinstance(result, Exception) and not isinstance(result, (OSError, ssl.SSLError)):
            raise result


async def serve(listen: tuple[str, int], upstream: tuple[str, int],
                context: ssl.SSLContext) -> None:
    server = await asyncio.start_server(
        lambda r, w: _relay(r, w, upstream, context), *listen)
    logger.info("relaying %s:%d -> etcd %s:%d over mutual TLS", *listen, *upstream)
    async with server:
        await server.serve_forever()


def probe(addr: tuple[str, int], timeout_s: float) -> int:
    """0 when etcd answers a status call through ``addr``; the sidecar's startup probe."""
    import etcd3  # scission's etcd client library, in the image

    client = etcd3.client(*addr, timeout=timeout_s)
    try:
        client.status()
    except etcd3.exceptions.Etcd3Exception as exc:
        logger.error("etcd through %s:%d: %s", *addr, exc)
        return 1
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 2379))
    parser.add_argument("--upstream", type=_host_port, help="etcd host:port (TLS)")
    parser.add_argument("--cacert", help="PEM CA of etcd's certificate")
    parser.add_argument("--cert", help="PEM client certificate")
    parser.add_argument("--key", help="PEM key of --cert")
    parser.add_argument("--probe", type=_host_port, metavar="HOST:PORT",
                        help="check etcd through a running proxy and exit")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="--probe deadline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.probe is not None:
        return probe(args.probe, args.timeout_s)
    if not (args.upstream and args.cacert and args.cert and args.key):
        parser.error("--upstream, --cacert, --cert and --key are required")
    asyncio.run(serve(args.listen, args.upstream,
                      client_context(args.cacert, args.cert, args.key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

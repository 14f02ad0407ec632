"""A real proxyless gRPC peer for meshfed's xDS tests (grpcio from PyPI).

server: answers /meshfed.test.Echo/Who with its name, plaintext or mTLS; with --fail-every N
        every Nth call fails with UNAVAILABLE (and prints "failed <n>"). With --watch DIR
        the certificate is DIR/cert-chain.pem + DIR/key.pem, re-read for new handshakes
        whenever DIR (a symlink swapped atomically) points somewhere new.
client: calls an xds:/// target every --interval and prints one line per call:
        "ok <server name>" or "err <CODE> <details>". GRPC_XDS_BOOTSTRAP names the bootstrap.
        --header k=v sends request metadata (what a route may match); --sni NAME sets the
        channel's TLS target name override, which grpcio sends as the SNI (grpcio does not
        send the xDS cluster's `sni`, gRFC A101), keeping the target as the authority.
"""
import argparse
import os
import sys
import threading
import time
from concurrent import futures

import grpc
import grpc.experimental


def serve(a):
    name = a.name
    calls = {"n": 0}
    lock = threading.Lock()

    def who(_req, ctx):
        with lock:
            calls["n"] += 1
            fail = a.fail_every > 0 and calls["n"] % a.fail_every == 0
        if fail:
            print("failed", calls["n"], flush=True)
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "meshfed.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    for addr in a.addr:
        if a.watch:
            server.add_secure_port(addr, watched_credentials(a.watch, a.roots))
        elif a.cert:
            with open(a.key, "rb") as f:
                key = f.read()
            with open(a.cert, "rb") as f:
                chain = f.read()
            with open(a.roots, "rb") as f:
                roots = f.read()
            creds = grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=roots, require_client_auth=True
            )
            server.add_secure_port(addr, creds)
        else:
            server.add_insecure_port(addr)
    server.start()
    print("serving", name, " ".join(a.addr), flush=True)
    server.wait_for_termination()


def read_watched(path):
    """(target, key, chain) of one consistent generation of the symlinked directory."""
    while True:
        target = os.path.realpath(path)
        with open(os.path.join(target, "key.pem"), "rb") as f:
            key = f.read()
        with open(os.path.join(target, "cert-chain.pem"), "rb") as f:
            chain = f.read()
        if os.path.realpath(path) == target:
            return target, key, chain


def watched_credentials(path, roots_path):
    with open(roots_path, "rb") as f:
        roots = f.read()
    target, key, chain = read_watched(path)
    state = {"target": target}

    def config(key, chain):
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch():
        if os.path.realpath(path) == state["target"]:
            return None
        target, key, chain = read_watched(path)
        state["target"] = target
        return config(key, chain)

    return grpc.dynamic_ssl_server_credentials(
        config(key, chain), fetch, require_client_authentication=True
    )


def client(a):
    options = []
    if a.sni:
        options.append(("grpc.ssl_target_name_override", a.sni))
        # The override would also become the authority the xDS routes are chosen by.
        options.append(("grpc.default_authority", a.target.split("///", 1)[-1]))
    if a.secure:
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(a.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(a.target, options=options)
    who = channel.unary_unary("/meshfed.test.Echo/Who")
    metadata = [tuple(h.split("=", 1)) for h in a.header]
    n = 0
    while a.calls == 0 or n < a.calls:
        n += 1
        try:
            r = who(b"", timeout=a.timeout, metadata=metadata or None)
            print("ok", r.decode(), flush=True)
        except grpc.RpcError as e:
            details = (e.details() or "").replace("\n", " ")[:300]
            print("err", e.code().name, details, flush=True)
        time.sleep(a.interval)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--addr", action="append", required=True)
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--roots")
    s.add_argument("--watch")
    s.add_argument("--fail-every", type=int, default=0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--secure", action="store_true")
    c.add_argument("--calls", type=int, default=0)
    c.add_argument("--interval", type=float, default=0.05)
    c.add_argument("--timeout", type=float, default=3.0)
    c.add_argument("--header", action="append", default=[])
    c.add_argument("--sni")
    a = p.parse_args()
    if a.cmd == "server":
        serve(a)
    else:
        client(a)


if __name__ == "__main__":
    sys.exit(main())

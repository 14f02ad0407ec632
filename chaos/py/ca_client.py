"""A real third-party client of Istio's CA API (grpcio from PyPI), as istio-agent calls it.

Calls /istio.v1.auth.IstioCertificateService/CreateCertificate over TLS (the server checked
against --roots and --server-name), with `authorization: Bearer <token>` when --token-file is
given, and prints one line: "ok <n>" (then the PEM chain it got, leaf first) or
"err <CODE> <details>". The messages are encoded by hand (no protobuf package here): field 1
csr (string), field 3 validity_duration (int64); the answer's field 1 is repeated strings.
"""
import argparse
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(csr, seconds):
    data = csr.encode()
    msg = b"\x0a" + varint(len(data)) + data
    if seconds:
        msg += b"\x18" + varint(seconds)
    return msg


def decode_chain(buf):
    chain, i = [], 0
    while i < len(buf):
        key = buf[i]
        i += 1
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type in field {key >> 3}")
        n, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if key >> 3 == 1:
            chain.append(buf[i : i + n].decode())
        i += n
    return chain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--server-name", required=True)
    p.add_argument("--roots", required=True)
    p.add_argument("--csr", required=True)
    p.add_argument("--token-file")
    p.add_argument("--seconds", type=int, default=0)
    a = p.parse_args()
    with open(a.roots, "rb") as f:
        roots = f.read()
    with open(a.csr) as f:
        csr = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    ch = grpc.secure_channel(
        a.addr, creds, options=[("grpc.ssl_target_name_override", a.server_name)]
    )
    call = ch.unary_unary(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        request_serializer=lambda m: m,
        response_deserializer=lambda b: b,
    )
    md = []
    if a.token_file:
        with open(a.token_file) as f:
            md.append(("authorization", "Bearer " + f.read().strip()))
    try:
        resp = call(encode_request(csr, a.seconds), metadata=md, timeout=20)
    except grpc.RpcError as e:
        print("err", e.code().name, e.details(), flush=True)
        return 0
    chain = decode_chain(resp)
    print("ok", len(chain), flush=True)
    sys.stdout.write("".join(chain))
    return 0


if __name__ == "__main__":
    sys.exit(main())

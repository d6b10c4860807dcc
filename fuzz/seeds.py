#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpora (corpus/<target>/seed-*): valid NBD
sessions, HTTP requests, kernel command lines and operation sequences for `ops`. The image
target's seeds are the images QEMU made (images/make.sh), copied as corpus/image/seed-*.
Run from fuzz/: python3 seeds.py"""
import os
import shutil
import struct

def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(data)

# --- image: QEMU's images.
for img in sorted(os.listdir("images")):
    if img.endswith(".qcow2"):
        shutil.copy(f"images/{img}", f"corpus/image/seed-{img}")

# --- ops: image, setup, then operations (see fuzz_targets/ops.rs).
def op_write(off, ln, pat): return bytes([0]) + struct.pack("<IHB", off, ln // 2, ln & 1) + bytes([pat])
def op_zero(off, ln, unmap=False): return bytes([1 | (0x80 if unmap else 0)]) + struct.pack("<IHB", off, ln // 2, ln & 1)
def op_discard(off, ln): return bytes([2]) + struct.pack("<IHB", off, ln // 2, ln & 1)
def op_read(off, ln): return bytes([3]) + struct.pack("<IHB", off, ln // 2, ln & 1)
FLUSH, REOPEN, CRASH = bytes([4]), bytes([6]), bytes([7])
def op_resize(grow): return bytes([5]) + struct.pack("<H", grow // 64)
def op_status(off, ln): return bytes([8]) + struct.pack("<IHB", off, ln // 2, ln & 1)

for img in range(7):
    for setup in (0, 2 | 4, 3 | 8 | 16):
        seq = [op_read(0, 20000), op_status(0, 65535), op_write(1000, 9000, 0x5a),
               op_read(0, 12000), op_zero(4096, 8192, True), op_discard(0, 65536),
               op_read(0, 65535), FLUSH, op_write(300000, 70000, 0xc3), CRASH,
               op_read(290000, 65535), op_resize(600000), op_write(1040000, 20000, 0x77),
               REOPEN, op_read(1030000, 40000), op_status(1000000, 60000)]
        put("ops", f"{img}-{setup}", bytes([img, setup]) + b"".join(seq))

# --- nbd: setup, cut, then a client session (see fuzz_targets/nbd.rs).
IHAVEOPT = 0x49484156454F5054
def opt(o, data=b""): return struct.pack(">QII", IHAVEOPT, o, len(data)) + data
def req(t, off, ln, flags=0, handle=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, t, handle, off, ln) + payload
name = struct.pack(">I", 4) + b"disk"
meta = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
session = (struct.pack(">I", 3) + opt(3) + opt(6, name + struct.pack(">H", 0))
           + opt(8) + opt(10, meta) + opt(7, name + struct.pack(">HH", 1, 3)))
cmds = (req(1, 4096, 5000, payload=b"\x5a" * 5000) + req(0, 0, 10000) + req(3, 0, 0)
        + req(6, 65536, 65536, flags=2) + req(4, 0, 4096) + req(7, 0, 1 << 20)
        + req(7, 0, 1 << 20, flags=8) + req(1, 1 << 20, 10, payload=b"x" * 10)
        + req(0, 0, 1 << 20) + req(9, 0, 0) + req(2, 0, 0))
put("nbd", "go", bytes([0, 0]) + session + cmds)
put("nbd", "go-raw-cut", bytes([16 | 2, 2]) + session + cmds)
put("nbd", "export-name", bytes([0, 3]) + struct.pack(">I", 1) + opt(1, b"disk") + cmds)
put("nbd", "readonly-shutdown", bytes([1 | 8, 1]) + session + cmds)
put("nbd", "bad", bytes([4, 0]) + struct.pack(">I", 3) + opt(99, b"?" * 20) + opt(7, b"\x00") + opt(2))

# --- http: mode, then requests (see fuzz_targets/http.rs).
reqs = [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\nAccept-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.0\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: deflate;q=0.5, gzip;q=0\r\n\r\n",
    b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 70 + b"\r\n",
]
for i, r in enumerate(reqs):
    put("http", str(i), bytes([i * 37 % 256]) + r)

# --- cmdline.
lines = [
    "log=debug ip=10.0.2.15/24 gw=10.0.2.2 export=disk ro=0 format=qcow2",
    "l2_cache=4M refcount_cache=512K mirage_metrics=1 debug_fault=none metrics_port=9090 nbd_port=10809",
    "ip=dhcp dns=1.1.1.1 unknown word log=trace format=raw ro=1",
    "l2_cache=18446744073709551615G ip=300.1.1.1/33 nbd_port=0",
]
for i, l in enumerate(lines):
    put("cmdline", str(i), l.encode())

"""A hand-made PostgreSQL client for the bypass tests: connects the way an
evasive workload would (a forged SO_MARK, TCP Fast Open, an IPv4-mapped
IPv6 socket), runs one simple-protocol query, and prints what came back:
`ok ROWS` or `error SQLSTATE MESSAGE`.

usage: pg_probe.py MODE HOST PORT SQL   (MODE: plain | mark=N | tfo | v4mapped)
"""
import socket
import struct
import sys

mode, host, port, sql = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
startup = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
startup = struct.pack("!i", len(startup) + 4) + startup

if mode == "v4mapped":
    s = socket.socket(socket.AF_INET6)
    s.connect(("::ffff:" + host, port))
    s.sendall(startup)
elif mode == "tfo":
    s = socket.socket(socket.AF_INET)
    s.sendto(startup, socket.MSG_FASTOPEN, (host, port))
else:
    s = socket.socket(socket.AF_INET)
    if mode.startswith("mark="):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mode[5:], 0))
    s.connect((host, port))
    s.sendall(startup)

buf = b""


def message():
    global buf
    while True:
        if len(buf) >= 5:
            n = struct.unpack("!i", buf[1:5])[0]
            if len(buf) >= n + 1:
                tag, body, buf = buf[0:1], buf[5 : n + 1], buf[n + 1 :]
                return tag, body
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("closed")
        buf += chunk


def fields(body):
    out = {}
    for f in body.split(b"\0"):
        if f:
            out[chr(f[0])] = f[1:].decode()
    return out


while True:
    tag, body = message()
    if tag == b"E":
        e = fields(body)
        print("error", e.get("C"), e.get("M"))
        sys.exit(0)
    if tag == b"Z":
        break

q = sql.encode() + b"\0"
s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
rows = 0
error = None
while True:
    tag, body = message()
    if tag == b"D":
        rows += 1
    elif tag == b"E":
        error = fields(body)
    elif tag == b"Z":
        break
if error:
    print("error", error.get("C"), error.get("M"))
else:
    print("ok", rows)
s.sendall(b"X\0\0\0\4")
s.close()

#!/usr/bin/env python3
"""One-way link latency without netem: hold the packets a host receives in user space.

    nfq_delay.py --queue 0 --delay-ms 2     (run inside the host's network namespace)

Some kernels ship without sch_netem (and without fq/etf, the qdiscs that honour a departure
time), but with nfnetlink_queue. An iptables NFQUEUE rule sends the packets arriving on the
host's link to queue Q; this program binds Q over raw netlink and gives each packet its
verdict (ACCEPT) DELAY after the kernel queued it. The delay is the same for every packet,
so the packets go on in the order they came, and one batch verdict ("accept every id up to
N") releases everything that is due: a wake-up costs the same for 1 or 500 packets. Only
metadata is copied (no payload), and GSO packets stay whole (NFQA_CFG_F_GSO), so the packet
rate stays that of the 64 KB segments the veth carries, not of 1500-byte frames.

`scripts/netns-hosts.sh delay NAME MS` installs the rule and starts one of these per host
(on arrival rather than departure: see the comment there). Precision is that of a Python
loop woken by select(): tens of microseconds, fine for delays of 0.1 ms and more. `ping`
does not show a delay made here (it times a reply by when the device received it, before
the queue); `ping -U` (user to user) does. The queue fails open (a packet is accepted at
once rather than dropped when the queue is full) and the rule bypasses the queue when no
program is bound, so stopping this program never cuts the link.

Protocol facts (linux/netfilter/nfnetlink_queue.h): subsystem NFNL_SUBSYS_QUEUE = 3; messages
PACKET 0, CONFIG 2, VERDICT_BATCH 3; config attributes CMD 1 (u8 command, u8 pad, be16 pf),
PARAMS 2 (be32 copy_range, u8 copy_mode), QUEUE_MAXLEN 3, MASK 4, FLAGS 5; packet attribute
PACKET_HDR 1 (be32 packet_id, ...); verdict attribute VERDICT_HDR 2 (be32 verdict, be32 id).
"""
import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
SUBSYS_QUEUE = 3
MSG_PACKET, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 2, 3
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, CMD_UNBIND = 1, 2
COPY_META = 1
F_FAIL_OPEN, F_GSO = 1, 4
PACKET_HDR, VERDICT_HDR = 1, 2
NF_ACCEPT = 1
SO_RCVBUFFORCE = 33


def attr(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


class Queue:
    def __init__(self, num):
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((0, 0))

    def send(self, msg, attrs, ack=False):
        self.seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", self.num) + b"".join(attrs)
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        head = struct.pack("=IHHII", 16 + len(body), (SUBSYS_QUEUE << 8) | msg, flags, self.seq, 0)
        self.sock.send(head + body)
        if ack:
            self.wait_ack()

    def wait_ack(self):
        while True:
            data = self.sock.recv(65536)
            for kind, payload in messages(data):
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"nfnetlink_queue refused the request: {os.strerror(code)}")
                    return

    def configure(self, maxlen):
        self.send(MSG_CONFIG, [attr(CFG_CMD, struct.pack(">BBH", CMD_BIND, 0, 0))], ack=True)
        self.send(MSG_CONFIG, [attr(CFG_PARAMS, struct.pack(">IB", 0, COPY_META))], ack=True)
        self.send(MSG_CONFIG, [attr(CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen))], ack=True)
        flags = struct.pack(">I", F_FAIL_OPEN | F_GSO)
        self.send(MSG_CONFIG, [attr(CFG_FLAGS, flags), attr(CFG_MASK, flags)], ack=True)

    def accept_through(self, packet_id):
        self.send(MSG_VERDICT_BATCH, [attr(VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id))])


def messages(data):
    """(type, payload after the nlmsghdr) for each netlink message in one datagram."""
    off = 0
    while off + 16 <= len(data):
        n, kind = struct.unpack_from("=IH", data, off)
        if n < 16:
            break
        yield kind & 0xFFFF, data[off + 16 : off + n]
        off += (n + 3) & ~3


def packet_id(payload):
    off = 4  # nfgenmsg
    while off + 4 <= len(payload):
        n, kind = struct.unpack_from("=HH", payload, off)
        if n < 4:
            return None
        if kind & 0x7FFF == PACKET_HDR:
            return struct.unpack_from(">I", payload, off + 4)[0]
        off += (n + 3) & ~3
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--maxlen", type=int, default=65536, help="packets the kernel may hold for us")
    a = ap.parse_args()
    delay = a.delay_ms / 1000.0
    q = Queue(a.queue)
    q.configure(a.maxlen)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"nfq_delay: queue {a.queue}, {a.delay_ms} ms", flush=True)
    pending = collections.deque()  # (due, packet id), in arrival (= id) order
    q.sock.setblocking(False)
    try:
        while True:
            timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
            ready, _, _ = select.select([q.sock], [], [], timeout)
            if ready:
                while True:
                    try:
                        data = q.sock.recv(1 << 20)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        # ENOBUFS: the socket overflowed and some packets' ids were lost; the
                        # next batch verdict covers them, since it accepts every id up to its own.
                        if e.errno == errno.ENOBUFS:
                            continue
                        raise
                    now = time.monotonic()
                    for kind, payload in messages(data):
                        if kind == (SUBSYS_QUEUE << 8) | MSG_PACKET:
                            pid = packet_id(payload)
                            if pid is not None:
                                pending.append((now + delay, pid))
            now = time.monotonic()
            last = None
            while pending and pending[0][0] <= now:
                last = pending.popleft()[1]
            if last is not None:
                q.accept_through(last)
    finally:
        # Hand back what is held, then unbind (the rule's bypass then passes packets on).
        if pending:
            q.accept_through(pending[-1][1])
        try:
            q.sock.setblocking(True)
            q.send(MSG_CONFIG, [attr(CFG_CMD, struct.pack(">BBH", CMD_UNBIND, 0, 0))])
        except OSError:
            pass


if __name__ == "__main__":
    main()

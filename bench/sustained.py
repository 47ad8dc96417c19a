"""Sustained connection rate through ONE source IP, and Dante's port exhaustion beside it.

Drives new SOCKS5 connections at a fixed rate (open loop: the rate does not
slow down when the proxy does) for a fixed time, each one handshake +
CONNECT + 64-byte echo + close, through the proxy to a loopback echo
server. Every session leaves the proxy from the same source IP (127.0.0.2
in ``bench/kumoproxy-bench.yaml``). Counts failures by kind: connect errors,
refused, resets, early closes, SOCKS5 error replies, timeouts, wrong bytes,
and "backlog": connections due while ``--max-inflight`` were still pending
(the server fell too far behind), which are skipped rather than queued.

    python bench/sustained.py                         # kumoproxy, 2,000/s for 60 s
    python bench/sustained.py --rates 1000,1500,2000 --seconds 30
    python bench/sustained.py --servers ours,dante    # Dante too (root: danted)

Why Dante fails: it binds each outbound socket to ``(external IP, 0)``
before connecting, so the kernel must find a port free of *every*
connection on that IP, TIME_WAIT included; at 2,000/s the ~28,000
ephemeral ports are gone in about 14 s. kumoproxy sets
IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect() for the full
4-tuple (wire.md §3). Dante gets a fresh external 127.0.5.x per run, so an
earlier run's TIME_WAIT sockets do not count against it.

The load generator is a small C program (epoll; the SOCKS5 client and the
echo server in one process), embedded below and built with ``gcc -O2``
into ``~/.cache/kumoproxy-bench/`` on first use: a Python client cannot
open 2,000 connections a second on two cores and leave any for the proxy.
Client sockets bind round robin to 127.0.3.1-16 so the client side never
runs short of ports. Loopback only. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BENCH_CONFIG = REPO / "bench" / "kumoproxy-bench.yaml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kumoproxy-bench"

#: Where each server listens (the bench config's port for ours).
OURS_PORT = 1090
DANTE_PORT = 11191

#: Client sources, round robin: 16 addresses x ~28k ports is far more than
#: a 60 s run needs even without TIME_WAIT reuse.
CLIENT_SOURCES = ",".join(f"127.0.3.{i}" for i in range(1, 17))

#: Failure kinds the load generator reports (``fail_<kind>=``).
FAILURE_KINDS = ("connect", "refused", "reset", "closed", "socks", "timeout", "proto")


# --------------------------------------------------------------------------
# The load generator


def build_loadgen() -> Path:
    """Compile the embedded C load generator once per source version; returns the binary."""
    digest = hashlib.sha256(LOADGEN_C.encode()).hexdigest()[:12]
    exe = CACHE / f"loadgen-{digest}"
    if not exe.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        source = CACHE / f"loadgen-{digest}.c"
        source.write_text(LOADGEN_C)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(source)], check=True)
    return exe


def run_loadgen(exe: Path, args: list[str], *, timeline: bool = False) -> dict[str, str]:
    """Run the load generator; its last stdout line as a dict (per-second lines to stderr)."""
    done = subprocess.run(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=None if timeline else subprocess.DEVNULL,
        text=True,
        check=True,
    )
    lines = done.stdout.strip().splitlines()
    return dict(pair.split("=", 1) for pair in lines[-1].split()) if lines else {}


# --------------------------------------------------------------------------
# Servers under test


def wait_port(port: int, timeout: float = 30.0) -> bool:
    """Wait until something accepts on 127.0.0.1:port (probing from a random 127.0.9.x)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        source = f"127.0.9.{random.randint(1, 250)}"
        try:
            socket.create_connection(("127.0.0.1", port), 0.5, (source, 0)).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@contextmanager
def serving(command: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server for the duration of the block; SIGTERM (then SIGKILL) its process group."""
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
        try:
            if not wait_port(port):
                log.seek(0)
                tail = log.read()[-1500:].decode(errors="replace")
                raise RuntimeError(f"{command[0]} did not listen on {port}:\n{tail}")
            yield child
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()


def ours_command(config: Path = BENCH_CONFIG) -> list[str]:
    return [str(BIN / "kumoproxy"), "serve", "--config", str(config)]


def dante_command(workdir: Path, external: str, port: int = DANTE_PORT) -> list[str]:
    """danted with no auth from loopback and ``external`` as its one source IP."""
    exe = shutil.which("danted") or "/usr/sbin/danted"
    if not Path(exe).exists():
        raise RuntimeError("danted is not installed (Debian: apt-get install dante-server)")
    conf = workdir / "danted.conf"
    conf.write_text(
        f"logoutput: {workdir}/danted.log\n"
        f"internal: 127.0.0.1 port = {port}\n"
        f"external: {external}\n"
        "socksmethod: none\nclientmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
    )
    return [exe, "-f", str(conf)]


def time_wait_count(source: str) -> int:
    """TIME_WAIT sockets whose local address is ``source`` (from /proc/net/tcp)."""
    wanted = socket.inet_aton(source)[::-1].hex().upper()
    with open("/proc/net/tcp") as table:
        next(table)
        return sum(
            1
            for line in table
            if (fields := line.split())[3] == "06" and fields[1].startswith(wanted)
        )


def settle_after_dante(source: str, *, below: int = 1, limit: float = 70.0) -> None:
    """Wait until fewer than ``below`` of Dante's TIME_WAIT sockets are left (at most ``limit`` s).

    Each came from ``bind(ip, 0)``, and while it lasts (60 s) its port is
    skipped by every connect() on the host that lets the kernel choose a
    port: a server measured right after Dante pays for Dante's run (we saw
    kumoproxy drop from ~1,900 to ~1,150 connections/s, and clients fail).
    """
    end = time.monotonic() + limit
    while time_wait_count(source) >= below and time.monotonic() < end:
        time.sleep(1)


def fresh_dante_source() -> str:
    """A loopback address no earlier run used (likely): TIME_WAIT must not count against Dante."""
    return f"127.0.5.{random.randint(1, 250)}"


@dataclass(frozen=True, slots=True)
class Server:
    """A server under test: how to start it and the port it listens on."""

    name: str
    port: int
    source: str  # the one source IP its sessions leave from
    config: Path = BENCH_CONFIG  # ours only

    def command(self, workdir: Path) -> list[str]:
        if self.name == "ours":
            return ours_command(self.config)
        return dante_command(workdir, self.source, self.port)


def add_ours_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--ours-config``: kumoproxy with another config (same listener and source)."""
    parser.add_argument(
        "--ours-config",
        type=Path,
        default=BENCH_CONFIG,
        help="kumoproxy config (default bench/kumoproxy-bench.yaml; e.g. a copy with workers: 1)",
    )


def make_server(name: str, ours_config: Path = BENCH_CONFIG) -> Server:
    if name == "ours":
        # The config must keep the bench config's listener and source.
        return Server("ours", OURS_PORT, "127.0.0.2", ours_config)
    if name == "dante":
        return Server("dante", DANTE_PORT, fresh_dante_source())
    raise SystemExit(f"unknown server {name!r} (ours, dante)")


# --------------------------------------------------------------------------
# The run


def sustained_args(
    server: Server, rate: float, seconds: float, timeout: float, max_inflight: int
) -> list[str]:
    target = f"127.0.0.1:{random.randint(19000, 19999)}"  # the bench config allows these
    return [
        "--proxy", f"127.0.0.1:{server.port}", "--target", target,
        "--client-src", CLIENT_SOURCES, "--rate", str(rate), "--seconds", str(seconds),
        "--warmup", "0", "--timeout", str(timeout), "--conns", str(max_inflight),
    ]  # fmt: skip


def report_line(server: Server, result: dict[str, str]) -> str:
    backlog = int(result.get("deferred", "0"))
    failed = int(result.get("failed", "-1")) + backlog
    kinds = ", ".join(
        [
            f"{kind} {result[f'fail_{kind}']}"
            for kind in FAILURE_KINDS
            if result.get(f"fail_{kind}", "0") != "0"
        ]
        + ([f"backlog {backlog}"] if backlog else [])
    )
    first = float(result.get("first_failure_s", "-1"))
    when = f", first at {first:.1f} s" if first >= 0 else ""
    return (
        f"{server.name:<6} {server.source:<11} {float(result['offered_per_s']):>7.0f} "
        f"{float(result['completed_per_s']):>9.0f} {failed:>8} "
        f"{float(result['hs_p50_ms']):>8.2f} {float(result['hs_p99_ms']):>8.2f} "
        f"{int(result['max_inflight']):>9}  {'PASS' if failed == 0 else 'FAIL'}"
        + (f"  ({kinds}{when})" if failed else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="ours", help="comma list of: ours, dante")
    parser.add_argument("--rates", default="2000", help="new connections/s, comma list")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="per connection, seconds")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=2000,
        help="connections pending at once; a start due beyond it is a failure (backlog). "
        "It also bounds what a server that stalls (Dante forks a process per waiting "
        "client) can do to a shared machine",
    )
    parser.add_argument("--timeline", action="store_true", help="per-second counts on stderr")
    add_ours_config_argument(parser)
    args = parser.parse_args()

    exe = build_loadgen()
    rates = [float(r) for r in args.rates.split(",") if r]
    print(
        f"# {args.seconds:g} s per run, each connection: SOCKS5 handshake + CONNECT + "
        f"64-byte echo + close, timeout {args.timeout:g} s"
    )
    print(
        f"{'server':<6} {'source':<11} {'offered':>7} {'completed':>9} {'failures':>8} "
        f"{'hs p50ms':>8} {'hs p99ms':>8} {'inflight':>9}  verdict"
    )
    with tempfile.TemporaryDirectory(prefix="kumoproxy-sustained-") as tmp:
        for name in [s for s in args.servers.split(",") if s]:
            for rate in rates:
                server = make_server(name, args.ours_config)  # Dante: a fresh IP per run
                with serving(server.command(Path(tmp)), server.port):
                    result = run_loadgen(
                        exe,
                        sustained_args(server, rate, args.seconds, args.timeout, args.max_inflight),
                        timeline=args.timeline,
                    )
                print(report_line(server, result), flush=True)
                if server.name == "dante":
                    settle_after_dante(server.source)
                time.sleep(1)
    return 0


#: The load generator (C, built on first use; see the module docstring).
LOADGEN_C = r"""/*
 * loadgen: new SOCKS5 connections at a fixed rate (or a fixed concurrency),
 * each CONNECT + echo + close, against an echo server in the same process.
 * Built and run by bench/sustained.py and bench/latency.py; loopback only.
 *
 *   --proxy IP:PORT   the proxy (omit with --direct)
 *   --direct          connect straight to the echo server (the baseline)
 *   --target IP:PORT  where the echo server listens (and CONNECT asks for)
 *   --client-src A[,B..]  bind client sockets to these, round robin
 *   --rate R          new connections per second (open loop); 0: closed loop
 *   --conns N         closed loop: connections in flight; open loop: the most
 *                     in flight at once (a start due beyond it is skipped and
 *                     counted as "deferred": the server fell that far behind)
 *   --seconds S --warmup W --timeout T --size N
 *
 * Counts only connections started inside the measuring window; waits for
 * them to finish (or time out). Per-second lines on stderr, one line of
 * key=value pairs on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum kind { CLIENT = 1, SERVER, LISTENER };
enum state { CONNECTING, GREETING, REPLY, ECHO };
enum failure { F_CONNECT, F_REFUSED, F_RESET, F_CLOSED, F_SOCKS, F_TIMEOUT, F_PROTO, NFAIL };
static const char *failure_names[NFAIL] = {"connect", "refused", "reset", "closed",
                                           "socks", "timeout", "proto"};

struct conn {
    int kind, fd;
    enum state st;
    int counted;
    double t0, t_hs;
    size_t got, want, echoed;
    unsigned char buf[64];
    struct conn *prev, *next; /* clients: the in-flight list, oldest first */
    unsigned char *ebuf;      /* servers: echo buffer */
    size_t elen, eoff;
};

static struct sockaddr_in proxy, target, srcs[64];
static int nsrcs, direct, ep;
static double rate, seconds = 60, warmup = 1, timeout_s = 5;
static int conns = 32;
static size_t size = 64;
static unsigned char *payload;
static double t_start, t_measure, t_end;
static long started, deferred, completed, fails[NFAIL], socks_rep[256], inflight, max_inflight;
static long sec_started[4096], sec_ok[4096], sec_failed[4096];
static double first_fail = -1;
static double *hs_lat, *tot_lat;
static long nlat, caplat;
static struct conn *head, *tail;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(2); }

static void parse_addr(const char *s, struct sockaddr_in *a) {
    char host[64];
    const char *colon = strrchr(s, ':');
    size_t n = colon ? (size_t)(colon - s) : strlen(s);
    if (n >= sizeof host) n = sizeof host - 1;
    memcpy(host, s, n);
    host[n] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(colon ? atoi(colon + 1) : 0);
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", s);
        exit(2);
    }
}

static void arm(struct conn *c, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static int second_of(double t) {
    int s = (int)(t - t_measure);
    return s < 0 ? -1 : s >= 4096 ? 4095 : s;
}

static void unlink_conn(struct conn *c) {
    if (c->prev) c->prev->next = c->next; else head = c->next;
    if (c->next) c->next->prev = c->prev; else tail = c->prev;
    inflight--;
}

static void start_client(void);

static void finish(struct conn *c, int failure) {
    double t = now();
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    unlink_conn(c);
    if (c->counted) {
        int s = second_of(c->t0);
        if (failure < 0) {
            completed++;
            if (s >= 0) sec_ok[s]++;
            if (nlat == caplat) {
                caplat = caplat ? caplat * 2 : 65536;
                hs_lat = realloc(hs_lat, caplat * sizeof *hs_lat);
                tot_lat = realloc(tot_lat, caplat * sizeof *tot_lat);
            }
            hs_lat[nlat] = c->t_hs - c->t0;
            tot_lat[nlat++] = t - c->t0;
        } else {
            fails[failure]++;
            if (s >= 0) sec_failed[s]++;
            if (first_fail < 0) first_fail = t - t_measure;
        }
    }
    free(c);
    if (rate == 0 && t < t_end) start_client(); /* closed loop: keep --conns in flight */
}

static void start_client(void) {
    struct conn *c = calloc(1, sizeof *c);
    c->kind = CLIENT;
    c->t0 = now();
    c->counted = c->t0 >= t_measure && c->t0 < t_end;
    started += c->counted;
    if (c->counted) sec_started[second_of(c->t0)]++;
    c->prev = tail;
    if (tail) tail->next = c; else head = c;
    tail = c;
    if (++inflight > max_inflight) max_inflight = inflight;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { /* out of descriptors: a failure to report, not a crash */
        unlink_conn(c);
        if (c->counted) { fails[F_CONNECT]++; sec_failed[second_of(c->t0)]++; }
        if (c->counted && first_fail < 0) first_fail = c->t0 - t_measure;
        free(c);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nsrcs) {
        setsockopt(c->fd, IPPROTO_IP, 24 /* IP_BIND_ADDRESS_NO_PORT */, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&srcs[started % nsrcs], sizeof srcs[0]) < 0)
            die("bind client source");
    }
    struct sockaddr_in *to = direct ? &target : &proxy;
    if (connect(c->fd, (struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        finish(c, errno == ECONNREFUSED ? F_REFUSED : F_CONNECT);
        return;
    }
    c->st = CONNECTING;
    arm(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static int send_small(struct conn *c, const void *data, size_t n) {
    return send(c->fd, data, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static void begin_echo(struct conn *c) {
    c->t_hs = now();
    c->st = ECHO;
    c->echoed = 0;
    if (send_small(c, payload, size)) { finish(c, F_RESET); return; }
    arm(c, EPOLLIN, EPOLL_CTL_MOD);
}

static int read_fail(ssize_t r) {
    return r == 0 ? F_CLOSED : errno == ECONNRESET ? F_RESET : F_PROTO;
}

static void client_event(struct conn *c) {
    if (c->st == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, err == ECONNREFUSED ? F_REFUSED : err == ECONNRESET ? F_RESET : F_CONNECT);
            return;
        }
        if (direct) { begin_echo(c); return; }
        static const unsigned char greeting[3] = {5, 1, 0};
        if (send_small(c, greeting, 3)) { finish(c, F_RESET); return; }
        c->st = GREETING;
        c->got = 0;
        c->want = 2;
        arm(c, EPOLLIN, EPOLL_CTL_MOD);
        return;
    }
    if (c->st == ECHO) {
        unsigned char rb[4096];
        for (;;) {
            ssize_t r = recv(c->fd, rb, sizeof rb, 0);
            if (r < 0 && errno == EAGAIN) return;
            if (r <= 0) { finish(c, read_fail(r)); return; }
            if (c->echoed + r > size || memcmp(rb, payload + c->echoed, r)) {
                finish(c, F_PROTO);
                return;
            }
            c->echoed += r;
            if (c->echoed == size) { finish(c, -1); return; }
        }
    }
    ssize_t r = recv(c->fd, c->buf + c->got, c->want - c->got, 0);
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0) { finish(c, read_fail(r)); return; }
    c->got += r;
    if (c->got < c->want) return;
    if (c->st == GREETING) {
        if (c->buf[0] != 5 || c->buf[1] != 0) { finish(c, F_PROTO); return; }
        unsigned char req[10] = {5, 1, 0, 1};
        memcpy(req + 4, &target.sin_addr, 4);
        memcpy(req + 8, &target.sin_port, 2);
        if (send_small(c, req, sizeof req)) { finish(c, F_RESET); return; }
        c->st = REPLY;
        c->got = 0;
        c->want = 5; /* VER REP RSV ATYP and one more byte, then the rest */
        return;
    }
    /* REPLY */
    if (c->buf[0] != 5) { finish(c, F_PROTO); return; }
    if (c->buf[1] != 0) { socks_rep[c->buf[1]] += c->counted; finish(c, F_SOCKS); return; }
    size_t total = c->buf[3] == 1 ? 10 : c->buf[3] == 4 ? 22 : c->buf[3] == 3 ? 7 + c->buf[4] : 0;
    if (!total || total > sizeof c->buf) { finish(c, F_PROTO); return; }
    if (c->want < total) { c->want = total; return; }
    begin_echo(c);
}

static void server_event(struct conn *c) {
    for (;;) {
        if (c->elen > c->eoff) {
            ssize_t w = send(c->fd, c->ebuf + c->eoff, c->elen - c->eoff, MSG_NOSIGNAL);
            if (w < 0 && errno == EAGAIN) { arm(c, EPOLLOUT, EPOLL_CTL_MOD); return; }
            if (w < 0) break;
            c->eoff += w;
            if (c->eoff < c->elen) { arm(c, EPOLLOUT, EPOLL_CTL_MOD); return; }
        }
        ssize_t r = recv(c->fd, c->ebuf, 4096, 0);
        if (r < 0 && errno == EAGAIN) { arm(c, EPOLLIN, EPOLL_CTL_MOD); return; }
        if (r <= 0) break; /* the peer's EOF (or reset): close, so it is passive */
        c->elen = r;
        c->eoff = 0;
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->ebuf);
    free(c);
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        c->kind = SERVER;
        c->fd = fd;
        c->ebuf = malloc(4096);
        arm(c, EPOLLIN, EPOLL_CTL_ADD);
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long n, double p) {
    if (!n) return 0;
    long i = (long)(n * p);
    return v[i >= n ? n - 1 : i] * 1e3;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--direct")) { direct = 1; continue; }
        const char *v = i + 1 < argc ? argv[++i] : NULL;
        if (!v) { fprintf(stderr, "missing value for %s\n", a); return 2; }
        if (!strcmp(a, "--proxy")) parse_addr(v, &proxy);
        else if (!strcmp(a, "--target")) parse_addr(v, &target);
        else if (!strcmp(a, "--client-src")) {
            char list[4096];
            snprintf(list, sizeof list, "%s", v);
            for (char *tok = strtok(list, ","); tok && nsrcs < 64; tok = strtok(NULL, ","))
                parse_addr(tok, &srcs[nsrcs++]);
        } else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--conns")) conns = atoi(v);
        else if (!strcmp(a, "--seconds")) seconds = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--size")) size = strtoul(v, NULL, 10);
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
    }
    if (!target.sin_port || (!direct && !proxy.sin_port)) {
        fprintf(stderr, "need --target and --proxy (or --direct)\n");
        return 2;
    }
    if (size < 1 || size > 4096) { fprintf(stderr, "--size must be 1..4096\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    payload = malloc(size);
    for (size_t i = 0; i < size; i++) payload[i] = 'a' + i % 26;

    ep = epoll_create1(0);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&target, sizeof target) < 0) die("bind echo server");
    if (listen(lfd, 65535) < 0) die("listen");
    static struct conn listener = {.kind = LISTENER};
    listener.fd = lfd;
    arm(&listener, EPOLLIN, EPOLL_CTL_ADD);

    t_start = now();
    t_measure = t_start + warmup;
    t_end = t_measure + seconds;
    double t_stop = t_end + timeout_s + 0.5;
    if (rate == 0)
        for (int i = 0; i < conns; i++) start_client();
    double planned = 0; /* open loop: starts due so far */
    int last_report = -1;
    struct epoll_event evs[1024];
    for (;;) {
        double t = now();
        if (rate > 0 && t < t_end) {
            double due = (t - t_start) * rate;
            for (; planned < due; planned += 1) {
                if (inflight < conns) {
                    start_client();
                } else if (t >= t_measure) { /* skipped, not queued: a failure */
                    deferred++;
                    sec_failed[second_of(t)]++;
                    if (first_fail < 0) first_fail = t - t_measure;
                }
            }
        }
        while (head && t - head->t0 > timeout_s) finish(head, F_TIMEOUT);
        for (int s = second_of(t); last_report + 1 < s && t <= t_end + 1; last_report++) {
            int p = last_report + 1; /* every second, even after a stall */
            fprintf(stderr, "second=%d started=%ld ok=%ld failed=%ld inflight=%ld\n", p + 1,
                    sec_started[p], sec_ok[p], sec_failed[p], inflight);
        }
        if (t >= t_end && (!head || t >= t_stop)) {
            int pending = 0;
            for (struct conn *c = head; c; c = c->next) pending += c->counted;
            if (!pending || t >= t_stop) break;
        }
        int n = epoll_wait(ep, evs, 1024, rate > 0 ? 1 : 50);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->kind == LISTENER) accept_all(c->fd);
            else if (c->kind == SERVER) server_event(c);
            else client_event(c);
        }
    }
    long failed = 0;
    for (int f = 0; f < NFAIL; f++) failed += fails[f];
    qsort(hs_lat, nlat, sizeof *hs_lat, cmp);
    qsort(tot_lat, nlat, sizeof *tot_lat, cmp);
    printf("started=%ld completed=%ld failed=%ld deferred=%ld seconds=%.1f offered_per_s=%.0f "
           "completed_per_s=%.0f max_inflight=%ld first_failure_s=%.2f hs_p50_ms=%.3f "
           "hs_p99_ms=%.3f hs_max_ms=%.3f total_p50_ms=%.3f total_p99_ms=%.3f",
           started, completed, failed, deferred, seconds, rate > 0 ? rate : started / seconds,
           completed / seconds, max_inflight, first_fail, pct(hs_lat, nlat, 0.5),
           pct(hs_lat, nlat, 0.99), nlat ? hs_lat[nlat - 1] * 1e3 : 0, pct(tot_lat, nlat, 0.5),
           pct(tot_lat, nlat, 0.99));
    for (int f = 0; f < NFAIL; f++) printf(" fail_%s=%ld", failure_names[f], fails[f]);
    for (int r = 1; r < 256; r++)
        if (socks_rep[r]) printf(" socks_rep_%d=%ld", r, socks_rep[r]);
    printf("\n");
    return 0;
}
"""


if __name__ == "__main__":
    sys.exit(main())

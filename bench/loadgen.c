/* loadgen: the benchmark's load generator. One process, one thread, epoll, non-blocking.
 *
 *   loadgen --mode pingpong|bulk|churn|idle --host 127.0.0.1 --port P
 *           [--conns C] [--duration S | --count N] [--size B] [--warmup S]
 *           [--gate] [--timeout S]
 *
 * pingpong  C connections, each with exactly one B-byte message in flight: send, wait for
 *           the whole echo, send the next. Round-trip time of every message is recorded.
 * bulk      C connections each writing B-byte chunks (default 64 KiB) and reading the echo,
 *           at most WINDOW bytes outstanding per connection.
 * churn     C workers, each: connect, 1-byte round trip, close, again.
 * idle      C connections opened (at most 256 connecting at a time), each does a 1-byte
 *           round trip so the proxy has surely opened its backend side, then all stay idle.
 *
 * Phases: connect, warm up (not recorded), quiesce, "ready", measured window, quiesce,
 * "result". Quiescing (nothing in flight) at both ends of the window makes a fixed-count
 * run exact, which is what the strace run needs. With --gate, after printing each of the
 * two JSON lines the program waits for a line on stdin: the harness samples the proxy's
 * CPU, RSS and syscall counters (or attaches strace) while nothing moves.
 *
 * Output: one JSON object per line on stdout: {"event":"ready",...} and
 * {"event":"result",...}. Latency percentiles come from a log-linear histogram
 * (64 sub-buckets per power of two: under 1.6 % error).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { PINGPONG, BULK, CHURN, IDLE };
enum phase { P_CONNECT, P_WARMUP, P_QUIESCE1, P_MEASURE, P_QUIESCE2 };
enum cstate { C_NONE, C_CONNECTING, C_READY, C_WAIT, C_DEAD };

#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define OCTAVES 48
#define NBUCKETS (OCTAVES * SUB)
#define MAX_CONNECTING 256
#define BULK_WINDOW (4u << 20)
#define IDLE_SETUP_NS 5000000000ull /* an idle connection not echoing by then has failed */

struct conn {
    int fd;
    enum cstate st;
    int want_out;        /* EPOLLOUT currently requested */
    uint64_t t0;         /* start of the message (pingpong) or cycle (churn, idle) */
    size_t sent, got;    /* bytes of the current message */
    uint64_t out_bytes;  /* bulk: bytes written and not yet read back */
};

static enum mode mode = PINGPONG;
static struct sockaddr_in target;
static int nconns = 1;
static double duration = 3.0, warmup = 0.5, timeout_s = 120.0;
static long long count_target = -1; /* fixed-count measured window when >= 0 */
static size_t msg_size = 0;
static int gate = 0;
static double rate = 0;        /* --rate: round trips (pingpong) or cycles (churn) per second; 0 = closed loop */
static uint64_t pace_t0;       /* when pacing started */
static long long pace_issued;  /* messages issued since then */
static int pace_waiting;       /* a connection is ready but waiting for its turn */

static struct conn *conns;
static char *sbuf, *rbuf;
static size_t rbuf_size;
static int ep;

static enum phase phase = P_CONNECT;
static int issuing;                   /* may new work start? */
static int measuring;                 /* are completions recorded? */
static long long inflight;            /* messages / cycles in flight; bulk: conns with bytes out */
static long long issued, completed;   /* in the measured window */
static long long errors, connected_ok, connect_failed, connect_started;
static long long connecting_now;
static uint64_t bytes_sent, bytes_recv; /* in the measured window */
static uint64_t hist[NBUCKETS];
static uint64_t lat_max, lat_sum, lat_n;
static uint64_t t_start, t_end, t_phase;
static uint64_t deadline_all; /* --timeout; time spent waiting at a gate does not count */
static struct rusage ru_start, ru_end;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int bucket_of(uint64_t v) {
    if (v < SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int octave = msb - SUB_BITS + 1;
    if (octave >= OCTAVES) return NBUCKETS - 1;
    return octave * SUB + (int)((v >> (msb - SUB_BITS)) - SUB);
}

static double bucket_mid(int idx) {
    int octave = idx / SUB, m = idx % SUB;
    if (octave == 0) return m;
    double lo = (double)((uint64_t)(SUB + m) << (octave - 1));
    return lo + (double)(1ull << (octave - 1)) / 2.0;
}

static void record(uint64_t ns) {
    hist[bucket_of(ns)]++;
    if (ns > lat_max) lat_max = ns;
    lat_sum += ns;
    lat_n++;
}

static double percentile(double p) {
    if (lat_n == 0) return 0;
    uint64_t want = (uint64_t)(p * (double)lat_n);
    if (want < 1) want = 1;
    uint64_t cum = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        cum += hist[i];
        if (cum >= want) {
            double v = bucket_mid(i);
            return v > (double)lat_max ? (double)lat_max : v;
        }
    }
    return (double)lat_max;
}

static void set_interest(struct conn *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (c->want_out != out) {
        c->want_out = out;
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void conn_close(struct conn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

static int conn_open(struct conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->st = C_CONNECTING;
    c->want_out = 1;
    c->sent = c->got = 0;
    c->out_bytes = 0;
    c->t0 = now_ns();
    int r = connect(fd, (struct sockaddr *)&target, sizeof target);
    if (r < 0 && errno != EINPROGRESS) {
        close(fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

/* A persistent connection failed mid-run: it is dropped, and counted. */
static void conn_lost(struct conn *c) {
    if (c->st == C_WAIT) inflight--;
    if (mode == BULK && c->out_bytes) inflight--;
    c->st = C_DEAD;
    conn_close(c);
    errors++;
    connected_ok--;
}

/* ---- pingpong ---- */

static void pp_send(struct conn *c, uint64_t now) {
    c->t0 = now;
    c->sent = c->got = 0;
    c->st = C_WAIT;
    inflight++;
    if (measuring) issued++;
    ssize_t w = send(c->fd, sbuf, msg_size, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN) { conn_lost(c); return; }
        w = 0;
    }
    c->sent = (size_t)w;
    if (measuring) bytes_sent += (uint64_t)w;
    if (c->sent < msg_size) set_interest(c, 1);
}

/* --rate: open-loop pacing, at most rate * elapsed messages (pingpong) or cycles (churn)
 * issued since work started, in bursts of at most 1 ms (the epoll timeout's resolution);
 * work refused here waits, and the main loop retries it. */
static int pace_ok(uint64_t now) {
    if (rate <= 0) return 1;
    if ((double)pace_issued >= rate * (double)(now - pace_t0) / 1e9) { pace_waiting = 1; return 0; }
    pace_issued++;
    return 1;
}

static int pp_may_issue(uint64_t now) {
    if (!issuing) return 0;
    if (phase == P_MEASURE) {
        if (count_target >= 0) {
            if (issued >= count_target) return 0;
        } else if (now >= t_start + (uint64_t)(duration * 1e9)) {
            return 0;
        }
    }
    return pace_ok(now);
}

static void pp_event(struct conn *c, uint32_t evs) {
    if ((evs & EPOLLOUT) && c->st == C_WAIT && c->sent < msg_size) {
        ssize_t w = send(c->fd, sbuf + c->sent, msg_size - c->sent, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN) { conn_lost(c); return; }
        if (w > 0) {
            c->sent += (size_t)w;
            if (measuring) bytes_sent += (uint64_t)w;
        }
        if (c->sent == msg_size) set_interest(c, 0);
    }
    if (!(evs & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    ssize_t n = recv(c->fd, rbuf, msg_size - c->got, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN)) { conn_lost(c); return; }
    if (n < 0) return;
    if (c->st != C_WAIT) { conn_lost(c); return; } /* unsolicited bytes: a broken proxy */
    c->got += (size_t)n;
    if (measuring) bytes_recv += (uint64_t)n;
    if (c->got < msg_size) return;
    uint64_t now = now_ns();
    c->st = C_READY;
    inflight--;
    if (measuring) {
        completed++;
        record(now - c->t0);
    }
    if (pp_may_issue(now)) pp_send(c, now);
}

/* ---- bulk ---- */

static void bulk_pump(struct conn *c) {
    int out = issuing && c->out_bytes < BULK_WINDOW;
    set_interest(c, out);
}

static void bulk_event(struct conn *c, uint32_t evs) {
    if (evs & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (int i = 0; i < 4; i++) {
            ssize_t n = recv(c->fd, rbuf, rbuf_size, 0);
            if (n == 0 || (n < 0 && errno != EAGAIN)) { conn_lost(c); return; }
            if (n < 0) break;
            if ((uint64_t)n > c->out_bytes) { conn_lost(c); return; } /* more back than sent */
            c->out_bytes -= (uint64_t)n;
            if (c->out_bytes == 0) inflight--;
            if (measuring) bytes_recv += (uint64_t)n;
            if ((size_t)n < rbuf_size) break;
        }
    }
    if ((evs & EPOLLOUT) && issuing && c->out_bytes < BULK_WINDOW) {
        ssize_t w = send(c->fd, sbuf, msg_size, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN) { conn_lost(c); return; }
        if (w > 0) {
            if (c->out_bytes == 0) inflight++;
            c->out_bytes += (uint64_t)w;
            if (measuring) bytes_sent += (uint64_t)w;
        }
    }
    bulk_pump(c);
}

/* ---- churn and idle: a cycle is connect, 1-byte round trip (and, for churn, close) ---- */

static void cycle_start(struct conn *c) {
    inflight++;
    if (measuring) issued++;
    connect_started++;
    connecting_now++;
    if (conn_open(c) < 0) {
        inflight--;
        connecting_now--;
        errors++;
        connect_failed++;
        c->st = C_NONE;
    }
}

static void cycle_fail(struct conn *c) {
    conn_close(c);
    inflight--;
    connecting_now--; /* a cycle counts as connecting until its byte is back */
    c->st = C_NONE;
    errors++;
    connect_failed++;
}

static int churn_may_issue(void) {
    if (!issuing) return 0;
    if (phase == P_MEASURE && count_target >= 0 && issued >= count_target) return 0;
    return rate > 0 ? pace_ok(now_ns()) : 1;
}

static void cycle_event(struct conn *c, uint32_t evs) {
    if (c->st == C_CONNECTING) {
        if (!(evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { cycle_fail(c); return; }
        if (send(c->fd, "x", 1, MSG_NOSIGNAL) != 1) { cycle_fail(c); return; }
        c->st = C_WAIT;
        set_interest(c, 0);
        return;
    }
    if (c->st != C_WAIT) {
        /* an idle connection that became readable: the proxy closed it (or sent junk) */
        if (mode == IDLE && c->st == C_READY) { c->st = C_DEAD; conn_close(c); errors++; connected_ok--; }
        return;
    }
    char b;
    ssize_t n = recv(c->fd, &b, 1, 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n != 1) { cycle_fail(c); return; }
    uint64_t now = now_ns();
    connecting_now--;
    inflight--;
    if (mode == IDLE) {
        c->st = C_READY;
        connected_ok++;
        record(now - c->t0);
        return;
    }
    conn_close(c);
    c->st = C_NONE;
    if (measuring) {
        completed++;
        bytes_sent++;
        bytes_recv++;
        record(now - c->t0);
    }
    if (churn_may_issue()) cycle_start(c);
}

/* A proxy that cannot accept (EMFILE) leaves connections in its backlog: the kernel
 * completed the handshake, but no echo ever comes. Fail them after IDLE_SETUP_NS. */
static void idle_reap(uint64_t now) {
    static uint64_t last;
    if (now - last < 200000000ull) return;
    last = now;
    for (long long i = 0; i < connect_started; i++) {
        struct conn *c = &conns[i];
        if ((c->st == C_CONNECTING || c->st == C_WAIT) && c->fd >= 0 && now - c->t0 > IDLE_SETUP_NS)
            cycle_fail(c);
    }
}

/* ---- phases ---- */

static void json_result(const char *event) {
    double dur = (double)(t_end - t_start) / 1e9;
    double ut = (double)(ru_end.ru_utime.tv_sec - ru_start.ru_utime.tv_sec) +
                (double)(ru_end.ru_utime.tv_usec - ru_start.ru_utime.tv_usec) / 1e6;
    double st = (double)(ru_end.ru_stime.tv_sec - ru_start.ru_stime.tv_sec) +
                (double)(ru_end.ru_stime.tv_usec - ru_start.ru_stime.tv_usec) / 1e6;
    static const char *names[] = {"pingpong", "bulk", "churn", "idle"};
    printf("{\"event\":\"%s\",\"mode\":\"%s\",\"conns\":%d,\"size\":%zu,"
           "\"count\":%lld,\"duration_s\":%.6f,\"rate\":%.3f,"
           "\"bytes_sent\":%llu,\"bytes_recv\":%llu,\"errors\":%lld,"
           "\"connected\":%lld,\"connect_failed\":%lld,"
           "\"lat_us\":{\"n\":%llu,\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,"
           "\"max\":%.2f,\"mean\":%.2f},"
           "\"loadgen_cpu_s\":{\"user\":%.6f,\"sys\":%.6f}}\n",
           event, names[mode], nconns, msg_size, mode == BULK ? 0 : completed, dur,
           dur > 0 ? (double)(mode == BULK ? bytes_recv : (uint64_t)completed) / dur : 0.0,
           (unsigned long long)bytes_sent, (unsigned long long)bytes_recv, errors,
           connected_ok, connect_failed, (unsigned long long)lat_n,
           percentile(0.50) / 1e3, percentile(0.90) / 1e3, percentile(0.99) / 1e3,
           percentile(0.999) / 1e3, (double)lat_max / 1e3,
           lat_n ? (double)lat_sum / (double)lat_n / 1e3 : 0.0, ut, st);
    fflush(stdout);
}

static void wait_gate(void) {
    if (!gate) return;
    char line[64];
    uint64_t t = now_ns();
    if (!fgets(line, sizeof line, stdin)) exit(0); /* the harness went away */
    deadline_all += now_ns() - t;
}

static void start_work(void) {
    uint64_t now = now_ns();
    issuing = 1;
    pace_t0 = now;
    pace_issued = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (mode == PINGPONG && c->st == C_READY && pp_may_issue(now)) pp_send(c, now);
        else if (mode == BULK && c->st == C_READY) bulk_pump(c);
        else if (mode == CHURN && c->st == C_NONE && churn_may_issue()) cycle_start(c);
    }
}

static void stop_work(void) {
    issuing = 0;
    if (mode == BULK)
        for (int i = 0; i < nconns; i++)
            if (conns[i].st == C_READY) bulk_pump(&conns[i]);
}

static void begin_measure(void) {
    memset(hist, 0, sizeof hist);
    lat_max = lat_sum = lat_n = 0;
    issued = completed = 0;
    bytes_sent = bytes_recv = 0;
    errors = 0;
    getrusage(RUSAGE_SELF, &ru_start);
    phase = P_MEASURE;
    measuring = 1;
    t_start = now_ns();
    if (mode == IDLE) return;
    start_work();
}

static void end_measure(uint64_t now) {
    t_end = now;
    getrusage(RUSAGE_SELF, &ru_end);
    measuring = 0;
    stop_work();
    phase = P_QUIESCE2;
    t_phase = now;
}

/* Connections are opened at most MAX_CONNECTING at a time: a burst of 10,000 SYNs would
 * overflow the proxy's accept backlog and turn into one-second SYN retransmits. */
static void connect_more(void) {
    /* A proxy out of fds fails every further attempt: stop early and report what it held. */
    long long max_failed = nconns / 100 > 50 ? nconns / 100 : 50;
    if (mode == IDLE && connect_failed >= max_failed) {
        while (connect_started < nconns) conns[connect_started++].st = C_DEAD;
        return;
    }
    while (connecting_now < MAX_CONNECTING && connect_started < nconns) {
        struct conn *c = &conns[connect_started];
        if (mode == IDLE) { cycle_start(c); continue; }
        connect_started++;
        connecting_now++;
        if (conn_open(c) < 0) { connecting_now--; connect_failed++; c->st = C_DEAD; }
    }
}

static void persistent_connect_event(struct conn *c, uint32_t evs) {
    (void)evs;
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    connecting_now--;
    if (err) { conn_close(c); c->st = C_DEAD; connect_failed++; return; }
    c->st = C_READY;
    connected_ok++;
    set_interest(c, 0);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --mode pingpong|bulk|churn|idle --host H --port P [--conns C]\n"
                    "               [--duration S | --count N] [--size B] [--warmup S] [--gate] [--timeout S]\n"
                    "               [--rate R]  (pingpong, churn: at most R round trips or cycles/s, all conns)\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--gate")) { gate = 1; continue; }
        if (!v) usage();
        i++;
        if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "pingpong")) mode = PINGPONG;
            else if (!strcmp(v, "bulk")) mode = BULK;
            else if (!strcmp(v, "churn")) mode = CHURN;
            else if (!strcmp(v, "idle")) mode = IDLE;
            else usage();
        } else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--count")) count_target = atoll(v);
        else if (!strcmp(a, "--size")) msg_size = (size_t)atoll(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else usage();
    }
    if (port <= 0 || nconns <= 0 || rate < 0) usage();
    if (msg_size == 0) msg_size = mode == BULK ? 65536 : 64;
    if (mode == CHURN || mode == IDLE) msg_size = 1;
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) { fprintf(stderr, "loadgen: bad host %s\n", host); return 2; }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    signal(SIGPIPE, SIG_IGN);
    conns = calloc((size_t)nconns, sizeof *conns);
    rbuf_size = msg_size > 65536 ? msg_size : 65536;
    sbuf = malloc(msg_size);
    rbuf = malloc(rbuf_size);
    if (!conns || !sbuf || !rbuf) { perror("loadgen: malloc"); return 1; }
    memset(sbuf, 'x', msg_size);
    for (int i = 0; i < nconns; i++) { conns[i].fd = -1; conns[i].st = C_NONE; }
    ep = epoll_create1(EPOLL_CLOEXEC);

    uint64_t t0 = now_ns();
    deadline_all = t0 + (uint64_t)(timeout_s * 1e9);
    uint64_t t_ready_connect = 0;
    struct epoll_event evs[1024];
    if (mode != CHURN) connect_more();
    else { phase = P_WARMUP; t_phase = t0; issuing = 1; start_work(); }

    for (;;) {
        uint64_t now = now_ns();
        /* phase transitions */
        if (phase == P_CONNECT && connect_started == nconns && connecting_now == 0) {
            t_ready_connect = now;
            if (connected_ok == 0) {
                printf("{\"event\":\"error\",\"error\":\"no connection succeeded\",\"connect_failed\":%lld}\n", connect_failed);
                return 1;
            }
            if (mode == IDLE) {
                phase = P_QUIESCE1;
            } else {
                phase = P_WARMUP;
                t_phase = now;
                start_work();
            }
        }
        if (phase == P_WARMUP && now >= t_phase + (uint64_t)(warmup * 1e9)) {
            stop_work();
            phase = P_QUIESCE1;
            t_phase = now;
        }
        if (phase == P_QUIESCE1 && inflight == 0) {
            printf("{\"event\":\"ready\",\"mode\":\"%s\",\"connected\":%lld,\"connect_failed\":%lld,"
                   "\"connect_s\":%.6f,\"errors\":%lld,\"setup_lat_us\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f}}\n",
                   mode == IDLE ? "idle" : "warm", connected_ok, connect_failed,
                   t_ready_connect ? (double)(t_ready_connect - t0) / 1e9 : 0.0, errors,
                   percentile(0.5) / 1e3, percentile(0.99) / 1e3, (double)lat_max / 1e3);
            fflush(stdout);
            wait_gate();
            begin_measure();
            now = now_ns();
        }
        if (phase == P_MEASURE) {
            int over;
            if (mode == IDLE) over = 1;
            else if (count_target >= 0) over = mode == BULK ? 1 : completed >= count_target;
            else over = now >= t_start + (uint64_t)(duration * 1e9);
            if (over) end_measure(now_ns());
        }
        if (phase == P_QUIESCE2 && (inflight == 0 || now >= t_phase + 2000000000ull)) {
            json_result("result");
            wait_gate();
            return 0;
        }
        if (now >= deadline_all) {
            printf("{\"event\":\"error\",\"error\":\"timeout\",\"phase\":%d,\"connected\":%lld,"
                   "\"inflight\":%lld,\"completed\":%lld}\n", (int)phase, connected_ok, inflight, completed);
            return 1;
        }
        if (mode != CHURN && phase != P_CONNECT && connected_ok == 0) {
            printf("{\"event\":\"error\",\"error\":\"all connections lost\",\"errors\":%lld}\n", errors);
            return 1;
        }

        if (rate > 0 && mode == PINGPONG && issuing && pace_waiting) {
            uint64_t t = now_ns();
            pace_waiting = 0;
            for (int i = 0; i < nconns; i++)
                if (conns[i].st == C_READY && pp_may_issue(t)) pp_send(&conns[i], t);
        }
        int timeout_ms = pace_waiting ? 1 : 100;
        if (phase == P_MEASURE && count_target < 0 && mode != IDLE) {
            uint64_t end = t_start + (uint64_t)(duration * 1e9);
            int64_t left = (int64_t)(end - now) / 1000000 + 1;
            if (left < timeout_ms) timeout_ms = left < 0 ? 0 : (int)left;
        }
        int n = epoll_wait(ep, evs, 1024, timeout_ms);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c->fd < 0) continue;
            if (mode == CHURN || mode == IDLE) { cycle_event(c, e); continue; }
            if (c->st == C_CONNECTING) { persistent_connect_event(c, e); continue; }
            if (c->st == C_DEAD) continue;
            if (mode == PINGPONG) pp_event(c, e);
            else bulk_event(c, e);
        }
        if (phase == P_CONNECT) connect_more();
        if (phase == P_CONNECT && mode == IDLE) idle_reap(now_ns());
        /* churn workers whose cycle failed (or that waited for their turn, --rate)
         * restart here, not recursively */
        if (mode == CHURN && issuing) {
            pace_waiting = 0;
            for (int i = 0; i < nconns; i++)
                if (conns[i].st == C_NONE && conns[i].fd < 0 && churn_may_issue()) cycle_start(&conns[i]);
        }
    }
}

/* echo: the benchmark's backends. One process, one thread, epoll, non-blocking.
 *
 *   echo --listen 127.0.0.1:0 [--listen 127.0.0.1:0 ...]
 *
 * Prints "listening on HOST:PORT" once per listener (ports from the kernel when 0),
 * then echoes every byte back on every accepted connection until SIGTERM/SIGINT.
 * EOF from the peer closes the connection (after the echo is flushed).
 *
 * Why C: the backends share a core with the load generator, and must cost far less than
 * any proxy under test, or the Python peers would not be the bottleneck.
 * Idle connections cost no heap: a connection owns a buffer only while a write is short.
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
#include <unistd.h>

#define MAX_LISTEN 16
#define RBUF (256 * 1024)

struct conn {
    char *pend;      /* unsent tail of the last echo, or NULL */
    size_t plen, poff;
    int listener;    /* nonzero for listening sockets */
};

static struct conn *conns; /* indexed by fd */
static int nconns_cap;
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    nconns_cap = (int)(rl.rlim_cur > 4000000 ? 4000000 : rl.rlim_cur) + 16;
}

static int parse_hostport(const char *s, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((unsigned short)atoi(colon + 1));
    if (host[0] == 0) sa->sin_addr.s_addr = htonl(INADDR_ANY);
    else if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) return -1;
    return 0;
}

static void close_conn(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    free(conns[fd].pend);
    memset(&conns[fd], 0, sizeof conns[fd]);
    close(fd);
}

/* Echo what was read; if the socket is full keep the tail and wait for EPOLLOUT,
 * reading nothing more meanwhile (that is the flow control: the sender blocks). */
static void on_readable(int ep, int fd, char *buf) {
    for (int rounds = 0; rounds < 16; rounds++) {
        ssize_t n = recv(fd, buf, RBUF, 0);
        if (n == 0) { close_conn(ep, fd); return; }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            close_conn(ep, fd);
            return;
        }
        ssize_t w = send(fd, buf, (size_t)n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN) { close_conn(ep, fd); return; }
            w = 0;
        }
        if (w < n) {
            struct conn *c = &conns[fd];
            c->pend = malloc((size_t)(n - w));
            if (!c->pend) { close_conn(ep, fd); return; }
            memcpy(c->pend, buf + w, (size_t)(n - w));
            c->plen = (size_t)(n - w);
            c->poff = 0;
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
            epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            return;
        }
        if (n < RBUF) return; /* drained: save a recv that would say EAGAIN */
    }
}

static void on_writable(int ep, int fd) {
    struct conn *c = &conns[fd];
    while (c->poff < c->plen) {
        ssize_t w = send(fd, c->pend + c->poff, c->plen - c->poff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) return;
            close_conn(ep, fd);
            return;
        }
        c->poff += (size_t)w;
    }
    free(c->pend);
    c->pend = NULL;
    c->plen = c->poff = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static void on_accept(int ep, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or EMFILE: try again on the next readiness */
        if (fd >= nconns_cap) { close(fd); continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { close(fd); continue; }
    }
}

int main(int argc, char **argv) {
    const char *addrs[MAX_LISTEN];
    int naddr = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--listen") && i + 1 < argc && naddr < MAX_LISTEN) addrs[naddr++] = argv[++i];
        else { fprintf(stderr, "usage: echo --listen HOST:PORT [--listen HOST:PORT ...]\n"); return 2; }
    }
    if (naddr == 0) addrs[naddr++] = "127.0.0.1:0";
    raise_nofile();
    conns = calloc((size_t)nconns_cap, sizeof *conns);
    char *buf = malloc(RBUF);
    if (!conns || !buf) { perror("echo: calloc"); return 1; }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < naddr; i++) {
        struct sockaddr_in sa;
        if (parse_hostport(addrs[i], &sa) < 0) { fprintf(stderr, "echo: bad address %s\n", addrs[i]); return 2; }
        int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) {
            fprintf(stderr, "echo: %s: %s\n", addrs[i], strerror(errno));
            return 1;
        }
        socklen_t sl = sizeof sa;
        getsockname(lfd, (struct sockaddr *)&sa, &sl);
        char host[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &sa.sin_addr, host, sizeof host);
        printf("listening on %s:%d\n", host, ntohs(sa.sin_port));
        conns[lfd].listener = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    }
    fflush(stdout);
    struct epoll_event evs[512];
    while (!stop) {
        int n = epoll_wait(ep, evs, 512, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (conns[fd].listener) { on_accept(ep, fd); continue; }
            if (evs[i].events & EPOLLOUT) on_writable(ep, fd);
            else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(ep, fd, buf);
        }
    }
    return 0;
}

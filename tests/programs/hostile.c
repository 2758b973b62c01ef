/*
 * hostile: socket calls with hostile arguments, made as raw system calls.
 *
 *   hostile SERVER_IP PORT SELF_IP SELF_PORT SELF6_PORT CLOSED_PORT EGRESS_IP EGRESS_PORT
 *
 * SERVER_IP:PORT is a TCP server that accepts and holds connections.
 * The program listens itself on 0.0.0.0:SELF_PORT and [::]:SELF6_PORT and
 * reaches those listeners at SELF_IP. Nothing listens on
 * SERVER_IP:CLOSED_PORT. EGRESS_IP:EGRESS_PORT is a server on a host
 * address (natively the same as the server).
 *
 * Run natively (everything on 127.0.0.1) and under `ax exec` (servers on
 * VIPs, egress on 127.0.0.1), the output must be the same, line for line:
 *
 *   case_name return_value errno_name [detail]
 *
 * `-` stands for "no errno" (the call succeeded). Details describe what
 * the call wrote (lengths, families, whether bytes past the truncation
 * were left alone), never values that differ between the runs (such as
 * ephemeral ports or the addresses themselves: `ip=ok` says the address
 * is the one expected).
 *
 * Every call that matters goes through syscall(2), so that no libc wrapper
 * checks or truncates an argument first. The sequence of calls is fixed,
 * so that file descriptor numbers come out the same in both runs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Upper bits the kernel ignores in an `int` argument. */
#define HIGH (1L << 32)
/* Refused from user space by sendmsg and sendmmsg. */
#define MSG_CMSG_COMPAT 0x80000000
#define SENTINEL 0xee

static struct in_addr server_ip, self_ip, egress_ip;
static int port, self_port, self6_port, closed_port, egress_port;
static long page;

static const char *errname(int e)
{
    static char buf[16];
    switch (e) {
#define E(x) case x: return #x;
    E(EPERM) E(ENOENT) E(EINTR) E(EBADF) E(EAGAIN) E(ENOMEM) E(EACCES)
    E(EFAULT) E(EBUSY) E(EEXIST) E(EINVAL) E(ENFILE) E(EMFILE) E(ENOSPC)
    E(EPIPE) E(ENOSYS) E(ENOTSOCK) E(EDESTADDRREQ) E(EMSGSIZE)
    E(EPROTOTYPE) E(ENOPROTOOPT) E(EPROTONOSUPPORT) E(EOPNOTSUPP)
    E(EAFNOSUPPORT) E(EADDRINUSE) E(EADDRNOTAVAIL) E(ENETDOWN)
    E(ENETUNREACH) E(ECONNABORTED) E(ECONNRESET) E(ENOBUFS) E(EISCONN)
    E(ENOTCONN) E(ETIMEDOUT) E(ECONNREFUSED) E(EHOSTUNREACH) E(EALREADY)
    E(EINPROGRESS)
#undef E
    }
    snprintf(buf, sizeof buf, "E%d", e);
    return buf;
}

/* One result line. */
static void report(const char *name, long ret, int err, const char *fmt, ...)
{
    char detail[256] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(detail, sizeof detail, fmt, ap);
        va_end(ap);
    }
    printf("%s %ld %s%s%s\n", name, ret, ret < 0 ? errname(err) : "-",
           detail[0] ? " " : "", detail);
    fflush(stdout);
}

static void die(const char *what)
{
    fprintf(stderr, "hostile: setup failed: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* A raw system call and its errno (0 on success). */
#define SYS(err, ...) (errno = 0, sys_ret = syscall(__VA_ARGS__), (err) = errno, sys_ret)
static long sys_ret;

#define CASE(name, ...)                                                   \
    do {                                                                  \
        int e_;                                                           \
        long r_ = SYS(e_, __VA_ARGS__);                                   \
        report(name, r_, e_, NULL);                                       \
    } while (0)

/* ---------------------------------------------------------------- memory */

static char *unmapped;  /* PROT_NONE */
static char *gone;      /* munmap'ed */
static char *ro;        /* read-only, holds a server address and ints */
static char *edge;      /* last 16 bytes before a PROT_NONE page */

static struct sockaddr_in sin_of(struct in_addr ip, int p)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(p);
    a.sin_addr = ip;
    return a;
}

static struct sockaddr_in6 mapped_of(struct in_addr ip, int p)
{
    struct sockaddr_in6 a;
    memset(&a, 0, sizeof a);
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(p);
    a.sin6_addr.s6_addr[10] = 0xff;
    a.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&a.sin6_addr.s6_addr[12], &ip, 4);
    return a;
}

static void setup_memory(void)
{
    page = sysconf(_SC_PAGESIZE);
    unmapped = mmap(NULL, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gone = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ro = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *two = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (unmapped == MAP_FAILED || gone == MAP_FAILED || ro == MAP_FAILED || two == MAP_FAILED)
        die("mmap");
    if (munmap(gone, page))
        die("munmap");
    struct sockaddr_in srv = sin_of(server_ip, port);
    memset(ro, SENTINEL, page);
    memcpy(ro, &srv, sizeof srv);
    int sixteen = 16;
    memcpy(ro + 64, &sixteen, sizeof sixteen);
    if (mprotect(ro, page, PROT_READ))
        die("mprotect ro");
    edge = two + page - sizeof srv;
    memcpy(edge, &srv, sizeof srv);
    if (mprotect(two + page, page, PROT_NONE))
        die("mprotect edge");
}

#define RO_ADDR ((long)ro)        /* a valid sockaddr_in of the server */
#define RO_INT16 ((long)ro + 64)  /* an int 16 nobody can write */

/* ---------------------------------------------------------------- sockets */

static int tcp(int family)
{
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    return fd;
}

/* A socket connected to ip:p (raw call, so that ax sees it too). */
static int connected_to(struct in_addr ip, int p)
{
    int fd = tcp(AF_INET);
    struct sockaddr_in a = sin_of(ip, p);
    if (syscall(SYS_connect, fd, &a, sizeof a))
        die("connect");
    return fd;
}

static int listener(int family, int p)
{
    int fd = tcp(family);
    long r;
    if (family == AF_INET) {
        struct sockaddr_in a = sin_of((struct in_addr){htonl(INADDR_ANY)}, p);
        r = syscall(SYS_bind, fd, &a, sizeof a);
    } else {
        struct sockaddr_in6 a;
        memset(&a, 0, sizeof a);
        a.sin6_family = AF_INET6;
        a.sin6_port = htons(p);
        r = syscall(SYS_bind, fd, &a, sizeof a);
    }
    if (r)
        die("bind listener");
    if (listen(fd, 64))
        die("listen");
    return fd;
}

/* Bytes known to be written, when a second run told (-1: unknown). */
static long written_override = -1;

/* What a call wrote into a buffer that was all SENTINEL. */
static const char *describe_addr(const unsigned char *buf, size_t size, int len,
                                 struct in_addr want_ip, int want_port)
{
    static char out[128];
    size_t tail = 0;
    while (tail < size && buf[size - 1 - tail] == SENTINEL)
        tail++;
    if (written_override >= 0)
        tail = size - (size_t)written_override;
    int fam = -1;
    if (buf[0] != SENTINEL || buf[1] != SENTINEL)
        fam = *(const unsigned short *)buf;
    char portdesc[24] = "?";
    char ipdesc[16] = "?";
    if (tail <= size - 4) {
        int p = ntohs(*(const unsigned short *)(buf + 2));
        if (want_port >= 0)
            snprintf(portdesc, sizeof portdesc, "%s", p == want_port ? "ok" : "WRONG");
        else
            snprintf(portdesc, sizeof portdesc, "%s", p ? "nonzero" : "0");
    }
    struct in_addr ip = {0};
    int have_ip = 0;
    if (fam == AF_INET && tail <= size - 8) {
        memcpy(&ip, buf + 4, 4);
        have_ip = 1;
    } else if (fam == AF_INET6 && tail <= size - 24) {
        static const unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        static const unsigned char any[16] = {0};
        if (!memcmp(buf + 8, prefix, 12)) {
            memcpy(&ip, buf + 20, 4);
            have_ip = 1;
        } else if (!memcmp(buf + 8, any, 16)) {
            have_ip = 1;
        } else {
            snprintf(ipdesc, sizeof ipdesc, "v6");
        }
    }
    if (have_ip) {
        if (ip.s_addr == htonl(INADDR_ANY))
            snprintf(ipdesc, sizeof ipdesc, "any");
        else
            snprintf(ipdesc, sizeof ipdesc, "%s", ip.s_addr == want_ip.s_addr ? "ok" : "WRONG");
    }
    snprintf(out, sizeof out, "len=%d fam=%d port=%s ip=%s untouched=%zu", len, fam,
             portdesc, ipdesc, tail);
    return out;
}

/*
 * getsockname/getpeername/accept-style call with a 32-byte SENTINEL buffer
 * whose length word starts at `len`; reports what was written.
 */
static long addr_call(const char *name, long nr, long fd, int len, struct in_addr want_ip,
                      int want_port, long flags)
{
    unsigned char buf[32];
    memset(buf, SENTINEL, sizeof buf);
    int n = len;
    int e;
    long r = SYS(e, nr, fd, buf, &n, flags);
    if (nr == SYS_getsockname || nr == SYS_getpeername) {
        /* A written byte may equal SENTINEL by chance (a port's low byte):
         * these calls change nothing, so ask again into a buffer filled with
         * another value, and count as written every byte that differs from
         * its fill in either run. */
        unsigned char again[32];
        memset(again, (unsigned char)~SENTINEL, sizeof again);
        int n2 = len;
        (void)syscall(nr, fd, again, &n2, flags);
        size_t written = 0;
        for (size_t i = 0; i < sizeof buf; i++)
            if (buf[i] != SENTINEL || again[i] != (unsigned char)~SENTINEL)
                written = i + 1;
        written_override = (long)written;
    }
    report(name, r, e, "%s", describe_addr(buf, sizeof buf, n, want_ip, want_port));
    written_override = -1;
    return r;
}

/* ---------------------------------------------------------------- cases */

static void connect_cases(void)
{
    struct sockaddr_in srv = sin_of(server_ip, port);
    struct sockaddr_in closed = sin_of(server_ip, closed_port);
    struct sockaddr_in egress = sin_of(egress_ip, egress_port);
    struct sockaddr_storage big;
    memset(&big, 0, sizeof big);
    memcpy(&big, &srv, sizeof srv);
    int fd;

#define FRESH(name, ...)                                                  \
    do {                                                                  \
        fd = tcp(AF_INET);                                                \
        CASE(name, __VA_ARGS__);                                          \
        close(fd);                                                        \
    } while (0)

    FRESH("connect_null_addr", SYS_connect, fd, NULL, 16);
    FRESH("connect_null_addr_len0", SYS_connect, fd, NULL, 0);
    FRESH("connect_unmapped_addr", SYS_connect, fd, unmapped, 16);
    FRESH("connect_munmapped_addr", SYS_connect, fd, gone, 16);
    FRESH("connect_kernel_addr", SYS_connect, fd, 0xffff880000000000UL, 16);
    FRESH("connect_addrlen_0", SYS_connect, fd, &srv, 0);
    FRESH("connect_addrlen_1", SYS_connect, fd, &srv, 1);
    FRESH("connect_addrlen_2", SYS_connect, fd, &srv, 2);
    FRESH("connect_addrlen_15", SYS_connect, fd, &srv, 15);
    FRESH("connect_addrlen_16", SYS_connect, fd, &big, 16);
    FRESH("connect_addrlen_17", SYS_connect, fd, &big, 17);
    FRESH("connect_addrlen_128", SYS_connect, fd, &big, 128);
    FRESH("connect_addrlen_129", SYS_connect, fd, &big, 129);
    FRESH("connect_addrlen_neg1", SYS_connect, fd, &big, -1);
    FRESH("connect_addrlen_intmin", SYS_connect, fd, &big, (long)INT32_MIN);
    FRESH("connect_addrlen_high_bits", SYS_connect, fd, &big, HIGH | 16);
    FRESH("connect_addr_readonly", SYS_connect, fd, RO_ADDR, 16);
    FRESH("connect_addr_page_edge_16", SYS_connect, fd, edge, 16);
    FRESH("connect_addr_page_edge_17", SYS_connect, fd, edge, 17);
    FRESH("connect_fd_high_bits", SYS_connect, HIGH | fd, &srv, 16);
    FRESH("connect_fd_neg1", SYS_connect, -1, &srv, 16);

    struct sockaddr_in unspec = srv;
    unspec.sin_family = AF_UNSPEC;
    FRESH("connect_unspec_fresh", SYS_connect, fd, &unspec, sizeof unspec);
    FRESH("connect_unspec_len2_fresh", SYS_connect, fd, &unspec, 2);
    struct sockaddr_in fam99 = srv;
    fam99.sin_family = 99;
    FRESH("connect_family_99", SYS_connect, fd, &fam99, sizeof fam99);
    struct sockaddr_in6 mapped = mapped_of(server_ip, port);
    FRESH("connect_inet6_addr_on_inet", SYS_connect, fd, &mapped, sizeof mapped);
    FRESH("connect_inet6_addr_on_inet_len16", SYS_connect, fd, &mapped, 16);

    FRESH("connect_closed_port", SYS_connect, fd, &closed, sizeof closed);
    FRESH("connect_egress", SYS_connect, fd, &egress, sizeof egress);

    /* Non-blocking: TCP always answers EINPROGRESS, then EISCONN. */
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("connect_nonblocking", SYS_connect, fd, &srv, sizeof srv);
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    poll(&pfd, 1, 5000);
    int soerr = -1;
    socklen_t sl = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    report("connect_nonblocking_so_error", soerr, 0, NULL);
    CASE("connect_nonblocking_again", SYS_connect, fd, &srv, sizeof srv);
    CASE("connect_nonblocking_third", SYS_connect, fd, &srv, sizeof srv);
    close(fd);
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("connect_nonblocking_closed_port", SYS_connect, fd, &closed, sizeof closed);
    pfd.fd = fd;
    pfd.events = POLLOUT;
    poll(&pfd, 1, 5000);
    soerr = -1;
    sl = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    report("connect_nonblocking_closed_port_so_error", -soerr, soerr, NULL);
    close(fd);
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("connect_nonblocking_egress", SYS_connect, fd, &egress, sizeof egress);
    pfd.fd = fd;
    poll(&pfd, 1, 5000);
    CASE("connect_nonblocking_egress_again", SYS_connect, fd, &egress, sizeof egress);
    close(fd);
    /* Connected elsewhere (a socket the kernel keeps, with a port of its
     * own), then to the server: EISCONN, the address read first. */
    fd = tcp(AF_INET);
    CASE("connect_egress_first", SYS_connect, fd, &egress, sizeof egress);
    CASE("connect_egress_then_server", SYS_connect, fd, &srv, sizeof srv);
    CASE("connect_egress_then_server_len1", SYS_connect, fd, &srv, 1);
    close(fd);

    /* AF_INET6 sockets. */
#define FRESH6(name, ...)                                                 \
    do {                                                                  \
        fd = tcp(AF_INET6);                                               \
        CASE(name, __VA_ARGS__);                                          \
        close(fd);                                                        \
    } while (0)
    struct sockaddr_in6 mbig[5];
    memset(mbig, 0, sizeof mbig);
    memcpy(mbig, &mapped, sizeof mapped);
    FRESH6("connect6_mapped", SYS_connect, fd, &mapped, sizeof mapped);
    FRESH6("connect6_mapped_len24", SYS_connect, fd, &mapped, 24);
    FRESH6("connect6_mapped_len23", SYS_connect, fd, &mapped, 23);
    FRESH6("connect6_mapped_len128", SYS_connect, fd, mbig, 128);
    FRESH6("connect6_inet_addr_len16", SYS_connect, fd, &big, 16);
    FRESH6("connect6_inet_addr_len28", SYS_connect, fd, &big, 28);
    FRESH6("connect6_null_addr", SYS_connect, fd, NULL, 28);
    FRESH6("connect6_unspec", SYS_connect, fd, &unspec, sizeof unspec);
    struct sockaddr_in6 scoped = mapped;
    scoped.sin6_scope_id = 1;
    FRESH6("connect6_mapped_scope1", SYS_connect, fd, &scoped, sizeof scoped);

    /* An already connected socket: the kernel still reads and checks the
     * address first; AF_UNSPEC disconnects. */
    fd = connected_to(server_ip, port);
    CASE("connect_connected_same", SYS_connect, fd, &srv, sizeof srv);
    CASE("connect_connected_null", SYS_connect, fd, NULL, 16);
    CASE("connect_connected_len0", SYS_connect, fd, &srv, 0);
    CASE("connect_connected_len1", SYS_connect, fd, &srv, 1);
    CASE("connect_connected_len15", SYS_connect, fd, &srv, 15);
    CASE("connect_connected_len129", SYS_connect, fd, &big, 129);
    CASE("connect_connected_family99", SYS_connect, fd, &fam99, sizeof fam99);
    CASE("connect_connected_inet6_addr", SYS_connect, fd, &mapped, sizeof mapped);
    CASE("connect_connected_closed_port", SYS_connect, fd, &closed, sizeof closed);
    CASE("connect_connected_unspec", SYS_connect, fd, &unspec, sizeof unspec);
    addr_call("getpeername_after_unspec", SYS_getpeername, fd, 16, server_ip, port, 0);
    CASE("connect_after_unspec", SYS_connect, fd, &srv, sizeof srv);
    addr_call("getpeername_after_reconnect", SYS_getpeername, fd, 16, server_ip, port, 0);
    CASE("connect_connected_unspec_len2", SYS_connect, fd, &unspec, 2);
    CASE("connect_after_unspec_len2", SYS_connect, fd, &srv, sizeof srv);
    close(fd);

    /* A socket bound to a wildcard address, not listening: it may connect. */
    struct sockaddr_in any0 = sin_of((struct in_addr){htonl(INADDR_ANY)}, 0);
#define BOUND(name, ...)                                                  \
    do {                                                                  \
        fd = tcp(AF_INET);                                                \
        if (syscall(SYS_bind, fd, &any0, sizeof any0))                    \
            die("bind any:0");                                            \
        CASE(name, __VA_ARGS__);                                          \
        close(fd);                                                        \
    } while (0)
    BOUND("connect_bound", SYS_connect, fd, &srv, sizeof srv);
    BOUND("connect_bound_egress", SYS_connect, fd, &egress, sizeof egress);
    BOUND("connect_bound_closed_port", SYS_connect, fd, &closed, sizeof closed);
    BOUND("connect_bound_null", SYS_connect, fd, NULL, 16);
    BOUND("connect_bound_len1", SYS_connect, fd, &srv, 1);
    BOUND("connect_bound_len15", SYS_connect, fd, &srv, 15);
    BOUND("connect_bound_family99", SYS_connect, fd, &fam99, sizeof fam99);
    BOUND("connect_bound_inet6_addr", SYS_connect, fd, &mapped, sizeof mapped);
    fd = tcp(AF_INET);
    if (syscall(SYS_bind, fd, &any0, sizeof any0))
        die("bind any:0");
    CASE("connect_bound_unspec", SYS_connect, fd, &unspec, sizeof unspec);
    addr_call("getsockname_bound_after_unspec", SYS_getsockname, fd, 16, self_ip, -1, 0);
    CASE("connect_bound_after_unspec", SYS_connect, fd, &srv, sizeof srv);
    close(fd);
}

static void listening_cases(int l)
{
    struct sockaddr_in srv = sin_of(server_ip, port);
    struct sockaddr_in fam99 = srv;
    fam99.sin_family = 99;
    CASE("connect_listening", SYS_connect, l, &srv, sizeof srv);
    CASE("connect_listening_null", SYS_connect, l, NULL, 16);
    CASE("connect_listening_len1", SYS_connect, l, &srv, 1);
    CASE("connect_listening_len129", SYS_connect, l, &srv, 129);
    CASE("connect_listening_family99", SYS_connect, l, &fam99, sizeof fam99);
    /* (AF_UNSPEC on a listener stops it listening: not tried here, the
     * listener is needed below; see the test's comment.) */
}

static void bind_cases(int l)
{
    struct sockaddr_in any0 = sin_of((struct in_addr){htonl(INADDR_ANY)}, 0);
    struct sockaddr_storage big;
    memset(&big, 0, sizeof big);
    memcpy(&big, &any0, sizeof any0);
    int fd;

    FRESH("bind_null_addr", SYS_bind, fd, NULL, 16);
    FRESH("bind_null_addr_len0", SYS_bind, fd, NULL, 0);
    FRESH("bind_unmapped_addr", SYS_bind, fd, unmapped, 16);
    FRESH("bind_munmapped_addr", SYS_bind, fd, gone, 16);
    FRESH("bind_addrlen_0", SYS_bind, fd, &any0, 0);
    FRESH("bind_addrlen_1", SYS_bind, fd, &any0, 1);
    FRESH("bind_addrlen_15", SYS_bind, fd, &any0, 15);
    FRESH("bind_addrlen_17", SYS_bind, fd, &big, 17);
    FRESH("bind_addrlen_128", SYS_bind, fd, &big, 128);
    FRESH("bind_addrlen_129", SYS_bind, fd, &big, 129);
    FRESH("bind_addrlen_neg1", SYS_bind, fd, &big, -1);
    FRESH("bind_addrlen_high_bits", SYS_bind, fd, &big, HIGH | 16);
    fd = tcp(AF_INET);
    CASE("bind_fd_high_bits", SYS_bind, HIGH | fd, &any0, 16);
    {
        struct sockaddr_in got;
        socklen_t gl = sizeof got;
        /* Where it got bound, and whether a client reaches it there. */
        if (listen(fd, 4) || syscall(SYS_getsockname, fd, &got, &gl))
            die("listen/getsockname after bind_fd_high_bits");
        struct sockaddr_in there = sin_of(self_ip, ntohs(got.sin_port));
        int c = tcp(AF_INET);
        CASE("connect_to_bind_fd_high_bits", SYS_connect, c, &there, sizeof there);
        close(c);
    }
    close(fd);
    struct sockaddr_in a = any0;
    a.sin_family = 99;
    FRESH("bind_family_99", SYS_bind, fd, &a, sizeof a);
    a.sin_family = AF_UNSPEC;
    FRESH("bind_unspec_any", SYS_bind, fd, &a, sizeof a);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    FRESH("bind_unspec_loopback", SYS_bind, fd, &a, sizeof a);
    struct sockaddr_in6 any6;
    memset(&any6, 0, sizeof any6);
    any6.sin6_family = AF_INET6;
    FRESH("bind_inet6_addr_on_inet", SYS_bind, fd, &any6, sizeof any6);
    FRESH6("bind6_inet_addr_len16", SYS_bind, fd, &big, 16);
    FRESH6("bind6_inet_addr_len28", SYS_bind, fd, &big, 28);
    FRESH6("bind6_addrlen_23", SYS_bind, fd, &any6, 23);
    struct sockaddr_in test_net = sin_of((struct in_addr){htonl(0xc0000201)}, 0);
    FRESH("bind_foreign_address", SYS_bind, fd, &test_net, sizeof test_net);
    struct sockaddr_in taken = sin_of((struct in_addr){htonl(INADDR_ANY)}, self_port);
    FRESH("bind_port_in_use", SYS_bind, fd, &taken, sizeof taken);
    struct sockaddr_in6 taken6 = any6;
    taken6.sin6_port = htons(self_port);
    FRESH6("bind6_port_in_use_by_inet", SYS_bind, fd, &taken6, sizeof taken6);

    /* A bound socket: every further bind is refused, after the address is
     * read and checked. */
#define BOUND_BIND(name, ...)                                             \
    do {                                                                  \
        fd = tcp(AF_INET);                                                \
        if (syscall(SYS_bind, fd, &any0, sizeof any0))                    \
            die("bind any:0");                                            \
        CASE(name, __VA_ARGS__);                                          \
        close(fd);                                                        \
    } while (0)
    BOUND_BIND("bind_twice", SYS_bind, fd, &any0, sizeof any0);
    BOUND_BIND("bind_twice_null", SYS_bind, fd, NULL, 16);
    BOUND_BIND("bind_twice_len8", SYS_bind, fd, &any0, 8);
    BOUND_BIND("bind_twice_len129", SYS_bind, fd, &big, 129);
    a = any0;
    a.sin_family = 99;
    BOUND_BIND("bind_twice_family99", SYS_bind, fd, &a, sizeof a);
    BOUND_BIND("bind_twice_inet6_addr", SYS_bind, fd, &any6, sizeof any6);
    BOUND_BIND("bind_twice_foreign_address", SYS_bind, fd, &test_net, sizeof test_net);

    CASE("bind_listening", SYS_bind, l, &any0, sizeof any0);
    CASE("bind_listening_null", SYS_bind, l, NULL, 16);
    fd = connected_to(server_ip, port);
    CASE("bind_connected", SYS_bind, fd, &any0, sizeof any0);
    CASE("bind_connected_null", SYS_bind, fd, NULL, 16);
    CASE("bind_connected_family99", SYS_bind, fd, &a, sizeof a);
    close(fd);
}

/* A client connection waiting in the listener's queue. */
static int pending[64];
static int npending;
/* The listeners on self_port and self6_port, for pend(). */
static int self_l = -1, self_l6 = -1;

static int port_has_sentinel(int p)
{
    return (p & 0xff) == SENTINEL || (p >> 8) == SENTINEL;
}

/*
 * Leaves a connection to port p waiting to be accepted. Its client's port
 * is what an accept writes after the family; a byte of it equal to SENTINEL
 * would look unwritten (accept_len4 once failed so, by chance): a client
 * whose port has one is accepted here, with any connection queued before
 * it, and replaced.
 */
static void pend(int p)
{
    if (npending == 64)
        die("too many pending clients");
    for (int tries = 0; tries < 64; tries++) {
        int fd = connected_to(self_ip, p);
        struct sockaddr_in a;
        socklen_t n = sizeof a;
        if (getsockname(fd, (struct sockaddr *)&a, &n))
            die("getsockname");
        int mine = ntohs(a.sin_port);
        if (!port_has_sentinel(mine)) {
            pending[npending++] = fd;
            return;
        }
        int l = p == self_port ? self_l : self_l6;
        for (;;) {
            struct sockaddr_in6 peer;
            socklen_t pn = sizeof peer;
            int c = accept(l, (struct sockaddr *)&peer, &pn);
            if (c < 0)
                die("accept");
            close(c);
            if (ntohs(peer.sin6_port) == mine)
                break;
        }
        close(fd);
    }
    die("no client port without the sentinel byte");
}

static void close_pending(void)
{
    while (npending > 0)
        close(pending[--npending]);
}

static void accepted(long r)
{
    if (r >= 0)
        close((int)r);
}

static void accept_cases(int l, int l6)
{
    unsigned char buf[32];
    int n, e;
    long r;

    self_l = l;
    self_l6 = l6;

    pend(self_port);
    r = SYS(e, SYS_accept, l, NULL, NULL);
    report("accept_null_addr_null_len", r, e, NULL);
    accepted(r);

    pend(self_port);
    n = 0x7eadbeef;
    r = SYS(e, SYS_accept, l, NULL, &n);
    report("accept_null_addr_garbage_len", r, e, "len=%d", n);
    accepted(r);

    pend(self_port);
    accepted(addr_call("accept_len16", SYS_accept, l, 16, self_ip, -1, 0));
    pend(self_port);
    accepted(addr_call("accept_len4", SYS_accept, l, 4, self_ip, -1, 0));
    pend(self_port);
    accepted(addr_call("accept_len1", SYS_accept, l, 1, self_ip, -1, 0));
    pend(self_port);
    accepted(addr_call("accept_len0", SYS_accept, l, 0, self_ip, -1, 0));
    pend(self_port);
    accepted(addr_call("accept_len32", SYS_accept, l, 32, self_ip, -1, 0));
    pend(self_port);
    accepted(addr_call("accept_len_neg1", SYS_accept, l, -1, self_ip, -1, 0));

    pend(self_port);
    memset(buf, SENTINEL, sizeof buf);
    r = SYS(e, SYS_accept, l, buf, NULL);
    report("accept_null_len", r, e, "%s", describe_addr(buf, sizeof buf, -1, self_ip, -1));
    accepted(r);

    pend(self_port);
    memset(buf, SENTINEL, sizeof buf);
    r = SYS(e, SYS_accept, l, buf, unmapped);
    report("accept_unmapped_len", r, e, "%s", describe_addr(buf, sizeof buf, -1, self_ip, -1));
    accepted(r);

    pend(self_port);
    memset(buf, SENTINEL, sizeof buf);
    r = SYS(e, SYS_accept, l, buf, RO_INT16);
    report("accept_readonly_len", r, e, "%s",
           describe_addr(buf, sizeof buf, *(int *)RO_INT16, self_ip, -1));
    accepted(r);

    pend(self_port);
    n = 32;
    r = SYS(e, SYS_accept, l, ro + 128, &n);
    report("accept_readonly_addr", r, e, "len=%d", n);
    accepted(r);

    pend(self_port);
    n = 32;
    r = SYS(e, SYS_accept, l, unmapped, &n);
    report("accept_unmapped_addr", r, e, "len=%d", n);
    accepted(r);

    pend(self_port);
    n = 0;
    r = SYS(e, SYS_accept, l, unmapped, &n);
    report("accept_unmapped_addr_len0", r, e, "len=%d", n);
    accepted(r);

    /* accept4: flags are checked before anything else happens. */
    pend(self_port);
    r = SYS(e, SYS_accept4, l, NULL, NULL, 0x40);
    report("accept4_bad_flags", r, e, NULL);
    accepted(r);
    r = SYS(e, SYS_accept4, l, NULL, NULL, -1L);
    report("accept4_all_flags", r, e, NULL);
    accepted(r);
    r = SYS(e, SYS_accept4, l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    report("accept4_nonblock_cloexec", r, e, "nonblock=%d cloexec=%d",
           r >= 0 ? !!(fcntl((int)r, F_GETFL) & O_NONBLOCK) : -1,
           r >= 0 ? !!(fcntl((int)r, F_GETFD) & FD_CLOEXEC) : -1);
    accepted(r);
    pend(self_port);
    r = SYS(e, SYS_accept4, l, NULL, NULL, HIGH);
    report("accept4_flags_high_bits", r, e, "nonblock=%d cloexec=%d",
           r >= 0 ? !!(fcntl((int)r, F_GETFL) & O_NONBLOCK) : -1,
           r >= 0 ? !!(fcntl((int)r, F_GETFD) & FD_CLOEXEC) : -1);
    accepted(r);
    pend(self_port);
    accepted(addr_call("accept_fd_high_bits", SYS_accept, HIGH | l, 16, self_ip, -1, 0));

    /* Nothing waiting on a non-blocking listener. */
    int fl = fcntl(l, F_GETFL);
    fcntl(l, F_SETFL, fl | O_NONBLOCK);
    CASE("accept_nonblocking_empty", SYS_accept, l, NULL, NULL);
    CASE("accept4_nonblocking_empty_bad_flags", SYS_accept4, l, NULL, NULL, 0x40);
    fcntl(l, F_SETFL, fl);

    /* Not a listener. */
    int fd = tcp(AF_INET);
    CASE("accept_fresh_socket", SYS_accept, fd, NULL, NULL);
    close(fd);
    struct sockaddr_in any0 = sin_of((struct in_addr){htonl(INADDR_ANY)}, 0);
    fd = tcp(AF_INET);
    if (syscall(SYS_bind, fd, &any0, sizeof any0))
        die("bind any:0");
    CASE("accept_bound_not_listening", SYS_accept, fd, NULL, NULL);
    CASE("accept4_bound_not_listening_bad_flags", SYS_accept4, fd, NULL, NULL, 0x40);
    close(fd);
    fd = connected_to(server_ip, port);
    CASE("accept_connected", SYS_accept, fd, NULL, NULL);
    close(fd);

    /* A dual-stack listener answers AF_INET6 (v4-mapped) addresses. */
    pend(self6_port);
    accepted(addr_call("accept6_len28", SYS_accept, l6, 28, self_ip, -1, 0));
    pend(self6_port);
    accepted(addr_call("accept6_len16", SYS_accept, l6, 16, self_ip, -1, 0));
    pend(self6_port);
    accepted(addr_call("accept6_len32", SYS_accept, l6, 32, self_ip, -1, 0));

    close_pending();
}

static void name_cases(int l, int l6)
{
    struct in_addr any = {htonl(INADDR_ANY)};
    unsigned char buf[32];
    int n, e;
    long r;

    int fd = tcp(AF_INET);
    addr_call("getsockname_fresh", SYS_getsockname, fd, 16, any, 0, 0);
    addr_call("getpeername_fresh", SYS_getpeername, fd, 16, any, 0, 0);
    CASE("getpeername_fresh_null", SYS_getpeername, fd, NULL, NULL);
    close(fd);

    addr_call("getsockname_listener", SYS_getsockname, l, 16, any, self_port, 0);
    addr_call("getsockname_listener_len4", SYS_getsockname, l, 4, any, self_port, 0);
    addr_call("getpeername_listener", SYS_getpeername, l, 16, any, 0, 0);
    CASE("getpeername_listener_null", SYS_getpeername, l, NULL, NULL);
    CASE("getsockname_listener_null_len", SYS_getsockname, l, buf, NULL);
    addr_call("getsockname_listener6", SYS_getsockname, l6, 32, any, self6_port, 0);
    addr_call("getsockname_listener6_len16", SYS_getsockname, l6, 16, any, self6_port, 0);

    struct sockaddr_in any0 = sin_of(any, 0);
    fd = tcp(AF_INET);
    if (syscall(SYS_bind, fd, &any0, sizeof any0))
        die("bind any:0");
    addr_call("getsockname_bound", SYS_getsockname, fd, 16, any, -1, 0);
    addr_call("getpeername_bound", SYS_getpeername, fd, 16, any, 0, 0);
    close(fd);

    fd = connected_to(server_ip, port);
    addr_call("getsockname_connected", SYS_getsockname, fd, 16, self_ip, -1, 0);
    addr_call("getpeername_connected", SYS_getpeername, fd, 16, server_ip, port, 0);
    addr_call("getsockname_connected_len4", SYS_getsockname, fd, 4, self_ip, -1, 0);
    addr_call("getpeername_connected_len4", SYS_getpeername, fd, 4, server_ip, port, 0);
    addr_call("getpeername_connected_len1", SYS_getpeername, fd, 1, server_ip, port, 0);
    addr_call("getpeername_connected_len0", SYS_getpeername, fd, 0, server_ip, port, 0);
    addr_call("getpeername_connected_len_neg1", SYS_getpeername, fd, -1, server_ip, port, 0);
    addr_call("getpeername_connected_len_intmax", SYS_getpeername, fd, 0x7fffffff, server_ip,
              port, 0);
    addr_call("getpeername_fd_high_bits", SYS_getpeername, HIGH | fd, 16, server_ip, port, 0);
    addr_call("getsockname_fd_high_bits", SYS_getsockname, HIGH | fd, 16, self_ip, -1, 0);
    CASE("getsockname_connected_null_len", SYS_getsockname, fd, buf, NULL);
    CASE("getpeername_connected_null_len", SYS_getpeername, fd, buf, NULL);
    CASE("getpeername_connected_unmapped_len", SYS_getpeername, fd, buf, unmapped);
    n = 32;
    r = SYS(e, SYS_getpeername, fd, NULL, &n);
    report("getpeername_connected_null_addr", r, e, "len=%d", n);
    n = 0;
    r = SYS(e, SYS_getpeername, fd, NULL, &n);
    report("getpeername_connected_null_addr_len0", r, e, "len=%d", n);
    n = 32;
    r = SYS(e, SYS_getsockname, fd, ro + 128, &n);
    report("getsockname_connected_readonly_addr", r, e, "len=%d", n);
    n = 32;
    r = SYS(e, SYS_getpeername, fd, unmapped, &n);
    report("getpeername_connected_unmapped_addr", r, e, "len=%d", n);
    memset(buf, SENTINEL, sizeof buf);
    r = SYS(e, SYS_getpeername, fd, buf, RO_INT16);
    report("getpeername_connected_readonly_len", r, e, "%s",
           describe_addr(buf, sizeof buf, *(int *)RO_INT16, server_ip, port));
    close(fd);

    /* Both ends of a connection to this program's own listener. */
    int c = connected_to(self_ip, self_port);
    long s = syscall(SYS_accept, l, NULL, NULL);
    if (s < 0)
        die("accept");
    addr_call("getsockname_accepted", SYS_getsockname, s, 16, self_ip, self_port, 0);
    addr_call("getpeername_accepted_len4", SYS_getpeername, s, 4, self_ip, -1, 0);
    addr_call("getpeername_accepted", SYS_getpeername, s, 16, self_ip, -1, 0);
    struct sockaddr_in srv = sin_of(server_ip, port);
    struct sockaddr_in unspec = srv;
    unspec.sin_family = AF_UNSPEC;
    CASE("connect_accepted", SYS_connect, s, &srv, sizeof srv);
    CASE("connect_accepted_null", SYS_connect, s, NULL, 16);
    CASE("bind_accepted", SYS_bind, s, &any0, sizeof any0);
    CASE("accept_accepted", SYS_accept, s, NULL, NULL);
    CASE("connect_accepted_unspec", SYS_connect, s, &unspec, sizeof unspec);
    addr_call("getpeername_accepted_after_unspec", SYS_getpeername, s, 16, self_ip, -1, 0);
    close((int)s);
    close(c);

    /* An AF_INET6 client. */
    struct sockaddr_in6 mapped = mapped_of(server_ip, port);
    fd = tcp(AF_INET6);
    CASE("connect6_first", SYS_connect, fd, &mapped, sizeof mapped);
    addr_call("getpeername6_connected", SYS_getpeername, fd, 32, server_ip, port, 0);
    addr_call("getpeername6_connected_len16", SYS_getpeername, fd, 16, server_ip, port, 0);
    addr_call("getsockname6_connected", SYS_getsockname, fd, 32, self_ip, -1, 0);
    CASE("connect6_connected_again", SYS_connect, fd, &mapped, sizeof mapped);
    CASE("connect6_connected_inet_addr", SYS_connect, fd, &srv, sizeof srv);
    CASE("connect6_connected_len1", SYS_connect, fd, &mapped, 1);
    CASE("connect6_connected_unspec", SYS_connect, fd, &unspec, sizeof unspec);
    addr_call("getpeername6_after_unspec", SYS_getpeername, fd, 32, server_ip, port, 0);
    CASE("connect6_after_unspec", SYS_connect, fd, &mapped, sizeof mapped);
    close(fd);
}

static void sockopt_cases(int l6)
{
    int fd = connected_to(server_ip, port);
    int v, n, e;
    long r;
    unsigned char big[64];
    int one = 1, zero = 0;

    long optfd = fd;
#define GETOPT(name, level, opt, size)                                    \
    do {                                                                  \
        memset(big, SENTINEL, sizeof big);                                \
        n = (size);                                                       \
        r = SYS(e, SYS_getsockopt, optfd, level, opt, big, &n);           \
        memcpy(&v, big, sizeof v);                                        \
        report(name, r, e, "len=%d val=%d", n, r == 0 ? v : -1);          \
    } while (0)
    GETOPT("getsockopt_nodelay", IPPROTO_TCP, TCP_NODELAY, 4);
    GETOPT("getsockopt_nodelay_len2", IPPROTO_TCP, TCP_NODELAY, 2);
    GETOPT("getsockopt_nodelay_len0", IPPROTO_TCP, TCP_NODELAY, 0);
    GETOPT("getsockopt_nodelay_len64", IPPROTO_TCP, TCP_NODELAY, 64);
    GETOPT("getsockopt_nodelay_len_neg1", IPPROTO_TCP, TCP_NODELAY, -1);
    GETOPT("getsockopt_unknown_tcp_option", IPPROTO_TCP, 9999, 4);
    GETOPT("getsockopt_so_domain", SOL_SOCKET, SO_DOMAIN, 4);
    GETOPT("getsockopt_so_domain_len2", SOL_SOCKET, SO_DOMAIN, 2);
    GETOPT("getsockopt_so_domain_len_neg1", SOL_SOCKET, SO_DOMAIN, -1);
    GETOPT("getsockopt_so_protocol", SOL_SOCKET, SO_PROTOCOL, 4);
    GETOPT("getsockopt_so_acceptconn", SOL_SOCKET, SO_ACCEPTCONN, 4);
    GETOPT("getsockopt_so_acceptconn_len2", SOL_SOCKET, SO_ACCEPTCONN, 2);
    GETOPT("getsockopt_so_acceptconn_len_neg1", SOL_SOCKET, SO_ACCEPTCONN, -1);
    CASE("setsockopt_so_acceptconn", SYS_setsockopt, fd, SOL_SOCKET, SO_ACCEPTCONN, &one, 4);
    CASE("setsockopt_so_acceptconn_len2", SYS_setsockopt, fd, SOL_SOCKET, SO_ACCEPTCONN, &one, 2);
    /* Options nobody set answer TCP's defaults. */
    GETOPT("getsockopt_keepidle", IPPROTO_TCP, TCP_KEEPIDLE, 4);
    GETOPT("getsockopt_keepintvl", IPPROTO_TCP, TCP_KEEPINTVL, 4);
    GETOPT("getsockopt_keepcnt", IPPROTO_TCP, TCP_KEEPCNT, 4);
    GETOPT("getsockopt_user_timeout", IPPROTO_TCP, TCP_USER_TIMEOUT, 4);
    GETOPT("getsockopt_cork", IPPROTO_TCP, TCP_CORK, 4);
    GETOPT("getsockopt_ip_ttl", IPPROTO_IP, IP_TTL, 4);
    GETOPT("getsockopt_ip_ttl_len1", IPPROTO_IP, IP_TTL, 1);
    GETOPT("getsockopt_ip_ttl_len2", IPPROTO_IP, IP_TTL, 2);
    GETOPT("getsockopt_ip_ttl_len_neg1", IPPROTO_IP, IP_TTL, -1);
    GETOPT("getsockopt_ip_tos", IPPROTO_IP, IP_TOS, 4);
    GETOPT("getsockopt_ipv6_level_on_inet", IPPROTO_IPV6, IPV6_V6ONLY, 4);
    CASE("setsockopt_ipv6_level_on_inet", SYS_setsockopt, fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero,
         4);
    CASE("getsockopt_ipv6_level_on_inet_null_optlen", SYS_getsockopt, fd, IPPROTO_IPV6,
         IPV6_V6ONLY, big, NULL);
    CASE("setsockopt_ipv6_level_on_inet_null", SYS_setsockopt, fd, IPPROTO_IPV6, IPV6_V6ONLY,
         NULL, 4);
    optfd = HIGH | fd;
    GETOPT("getsockopt_fd_high_bits", IPPROTO_TCP, TCP_NODELAY, 4);
    optfd = fd;
    CASE("getsockopt_null_optlen", SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, big, NULL);
    CASE("getsockopt_unmapped_optlen", SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, big,
         unmapped);
    CASE("getsockopt_so_domain_null_optlen", SYS_getsockopt, fd, SOL_SOCKET, SO_DOMAIN, big,
         NULL);
    n = 8;
    r = SYS(e, SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, NULL, &n);
    report("getsockopt_null_optval", r, e, "len=%d", n);
    n = 8;
    r = SYS(e, SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, ro + 128, &n);
    report("getsockopt_readonly_optval", r, e, "len=%d", n);
    n = 8;
    r = SYS(e, SYS_getsockopt, fd, SOL_SOCKET, SO_DOMAIN, NULL, &n);
    report("getsockopt_so_domain_null_optval", r, e, "len=%d", n);
    n = 4;
    r = SYS(e, SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, big, RO_INT16);
    report("getsockopt_readonly_optlen", r, e, NULL);

    CASE("setsockopt_nodelay", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, 4);
    GETOPT("getsockopt_nodelay_after_set", IPPROTO_TCP, TCP_NODELAY, 4);
    CASE("setsockopt_nodelay_len2", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, 2);
    CASE("setsockopt_nodelay_len0", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, 0);
    CASE("setsockopt_nodelay_len_neg1", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one,
         -1);
    CASE("setsockopt_nodelay_len_high_bits", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY,
         &zero, HIGH | 4);
    GETOPT("getsockopt_nodelay_after_high_bits", IPPROTO_TCP, TCP_NODELAY, 4);
    CASE("setsockopt_nodelay_null", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, NULL, 4);
    CASE("setsockopt_nodelay_unmapped", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, unmapped,
         4);
    CASE("setsockopt_unknown_tcp_option", SYS_setsockopt, fd, IPPROTO_TCP, 9999, &one, 4);
    CASE("setsockopt_keepcnt_0", SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPCNT, &zero, 4);
    CASE("setsockopt_keepidle_0", SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPIDLE, &zero, 4);
    CASE("setsockopt_so_domain", SYS_setsockopt, fd, SOL_SOCKET, SO_DOMAIN, &one, 4);
    CASE("setsockopt_so_domain_len0", SYS_setsockopt, fd, SOL_SOCKET, SO_DOMAIN, &one, 0);
    CASE("setsockopt_so_domain_null", SYS_setsockopt, fd, SOL_SOCKET, SO_DOMAIN, NULL, 4);
    CASE("setsockopt_fd_high_bits", SYS_setsockopt, HIGH | fd, IPPROTO_TCP, TCP_KEEPCNT, &one,
         4);
    GETOPT("getsockopt_keepcnt_after_fd_high_bits", IPPROTO_TCP, TCP_KEEPCNT, 4);
    CASE("setsockopt_level_high_bits", SYS_setsockopt, fd, HIGH | IPPROTO_TCP, TCP_NODELAY, &one,
         4);
    close(fd);

    /* The AF_INET6 listener. */
    optfd = l6;
    GETOPT("getsockopt6_v6only", IPPROTO_IPV6, IPV6_V6ONLY, 4);
    GETOPT("getsockopt6_v6only_len1", IPPROTO_IPV6, IPV6_V6ONLY, 1);
    GETOPT("getsockopt6_v6only_len_neg1", IPPROTO_IPV6, IPV6_V6ONLY, -1);
    GETOPT("getsockopt6_unicast_hops", IPPROTO_IPV6, IPV6_UNICAST_HOPS, 4);
    GETOPT("getsockopt6_so_domain", SOL_SOCKET, SO_DOMAIN, 4);
    GETOPT("getsockopt6_keepidle", IPPROTO_TCP, TCP_KEEPIDLE, 4);
}

/* ---------------------------------------------------- every option, swept */

/* Options whose answers legitimately differ between two TCP sockets, or
 * between a swapped socket and a TCP one (see tests/tests/hostile.rs). */
static int sweep_skips(int level, int opt)
{
    if (level == SOL_SOCKET)
        switch (opt) {
        case SO_SNDBUF: case SO_RCVBUF:            /* UNIX buffer sizes */
        case SO_PEERCRED: case SO_PEERSEC:         /* UNIX peers only */
        case 28 /* SO_PEERNAME */: case 59 /* SO_PEERGROUPS */:
        case 77 /* SO_PEERPIDFD: a new fd */:
        case 57 /* SO_COOKIE */: case 71 /* SO_NETNS_COOKIE */:
        case 55 /* SO_MEMINFO */: case 49 /* SO_INCOMING_CPU */:
        case 56 /* SO_INCOMING_NAPI_ID */:
            return 1;
        }
    if (level == IPPROTO_IP && opt == 52)          /* IP_PROTOCOL: the local port */
        return 1;
    if (level == IPPROTO_TCP)
        switch (opt) {
        case TCP_INFO: case 26 /* TCP_CC_INFO */:  /* live counters */
        case 35 /* TCP_ZEROCOPY_RECEIVE */:       /* reads a request */
        case 24 /* TCP_TIMESTAMP */:              /* a random offset */
            return 1;
        }
    return 0;
}

static void sweep_get(const char *tag, int fd)
{
    static const struct {
        const char *name;
        int level, max;
    } levels[] = {{"ip", IPPROTO_IP, 80},
                  {"ipv6", IPPROTO_IPV6, 80},
                  {"tcp", IPPROTO_TCP, 48},
                  {"sock", SOL_SOCKET, 80}};
    unsigned char buf[256];
    char name[80], hex[2 * 64 + 1];
    for (size_t l = 0; l < sizeof levels / sizeof levels[0]; l++)
        for (int opt = 0; opt <= levels[l].max; opt++) {
            if (sweep_skips(levels[l].level, opt))
                continue;
            /* The sweep of sets moved the connection's MSS. */
            if (!strcmp(tag, "conn_after_set") && levels[l].level == IPPROTO_TCP && opt == 2)
                continue;
            int n = sizeof buf, e;
            memset(buf, 0, sizeof buf);
            long r = SYS(e, SYS_getsockopt, fd, levels[l].level, opt, buf, &n);
            hex[0] = 0;
            for (int i = 0; r == 0 && i < n && i < 64; i++)
                sprintf(hex + 2 * i, "%02x", buf[i]);
            snprintf(name, sizeof name, "sweep_%s_get_%s_%d", tag, levels[l].name, opt);
            report(name, r, e, "len=%d val=%s", r == 0 ? n : -1, hex);
        }
}

/* setsockopt of a zero int, then the option read back. */
static void sweep_set(const char *tag, int fd)
{
    static const struct {
        const char *name;
        int level, max;
    } levels[] = {{"ip", IPPROTO_IP, 80}, {"ipv6", IPPROTO_IPV6, 80}, {"tcp", IPPROTO_TCP, 48}};
    char name[80];
    int zero = 0;
    for (size_t l = 0; l < sizeof levels / sizeof levels[0]; l++)
        for (int opt = 0; opt <= levels[l].max; opt++) {
            snprintf(name, sizeof name, "sweep_%s_set_%s_%d", tag, levels[l].name, opt);
            CASE(name, SYS_setsockopt, fd, levels[l].level, opt, &zero, 4);
        }
    /* The socket-level options TCP and UNIX answer differently. */
    static const int sock_opts[] = {16 /* SO_PASSCRED */, 34 /* SO_PASSSEC */,
                                    74 /* SO_TXREHASH */, 76 /* SO_PASSPIDFD */};
    for (size_t i = 0; i < sizeof sock_opts / sizeof sock_opts[0]; i++) {
        snprintf(name, sizeof name, "sweep_%s_set_sock_%d", tag, sock_opts[i]);
        CASE(name, SYS_setsockopt, fd, SOL_SOCKET, sock_opts[i], &zero, 4);
    }
}

static void sweep_cases(int l, int l6)
{
    int fd = connected_to(server_ip, port);
    sweep_get("conn", fd);
    sweep_set("conn", fd);
    sweep_get("conn_after_set", fd);
    close(fd);
    /* An AF_INET6 socket connected to the IPv4 server (v4-mapped). */
    fd = tcp(AF_INET6);
    struct sockaddr_in6 m = mapped_of(server_ip, port);
    if (syscall(SYS_connect, fd, &m, sizeof m))
        die("connect6");
    sweep_get("conn6", fd);
    close(fd);
    sweep_get("listen", l);
    sweep_get("listen6", l6);
}

/* ------------------------------------------------------------- sends */

static volatile sig_atomic_t sigpipes;
static void on_sigpipe(int sig)
{
    (void)sig;
    sigpipes++;
}

static void wait_writable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    poll(&p, 1, 5000);
}

/* sendto/sendmsg/sendmmsg that name a destination or carry MSG_FASTOPEN
 * (TCP Fast Open: a send that connects). Natively the client bit of
 * net.ipv4.tcp_fastopen is on (the default) and the servers have no Fast
 * Open cookie, so a blocking Fast Open connects, then sends. */
static void send_cases(int l)
{
    struct sockaddr_in srv = sin_of(server_ip, port);
    struct sockaddr_in closed = sin_of(server_ip, closed_port);
    struct sockaddr_in egress = sin_of(egress_ip, egress_port);
    struct sockaddr_in udp_dst = sin_of(egress_ip, closed_port);
    /* 192.0.2.1:9 (TEST-NET-1): an address TCP ignores; never reached. */
    struct sockaddr_in other = sin_of((struct in_addr){htonl(0xc0000201)}, 9);
    struct sockaddr_in unspec = srv, fam99 = srv;
    unspec.sin_family = AF_UNSPEC;
    fam99.sin_family = 99;
    struct sockaddr_storage big;
    memset(&big, 0, sizeof big);
    memcpy(&big, &srv, sizeof srv);
    int fd;
    signal(SIGPIPE, on_sigpipe);

#define TFO(name, ...)                                                    \
    do {                                                                  \
        fd = tcp(AF_INET);                                                \
        CASE(name, SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, __VA_ARGS__);   \
        close(fd);                                                        \
    } while (0)
    TFO("tfo_null_addr", NULL, 0);
    TFO("tfo_len0", &srv, 0);
    TFO("tfo_len1", &srv, 1);
    TFO("tfo_len15", &srv, 15);
    TFO("tfo_len129", &big, 129);
    TFO("tfo_len_neg1", &srv, -1);
    TFO("tfo_unmapped_addr", unmapped, 16);
    TFO("tfo_unspec", &unspec, sizeof unspec);
    TFO("tfo_family99", &fam99, sizeof fam99);
    TFO("tfo_closed_port", &closed, sizeof closed);
    TFO("tfo_server", &srv, sizeof srv);
    TFO("tfo_server_len128", &big, sizeof big);
    TFO("tfo_server_len_high_bits", &srv, HIGH | sizeof srv);
    TFO("tfo_egress", &egress, sizeof egress);
#undef TFO

    /* The data cannot be read: the kernel connects first, then fails. */
    fd = tcp(AF_INET);
    CASE("tfo_unmapped_data", SYS_sendto, fd, unmapped, 2, MSG_FASTOPEN, &srv, sizeof srv);
    CASE("tfo_after_unmapped_data", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    close(fd);
    fd = tcp(AF_INET);
    CASE("tfo_len0_data", SYS_sendto, fd, "hi", 0, MSG_FASTOPEN, &srv, sizeof srv);
    close(fd);

    /* Connected: Fast Open is EISCONN; an address without it is ignored. */
    fd = connected_to(server_ip, port);
    CASE("tfo_connected", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    CASE("tfo_connected_null", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, NULL, 0);
    CASE("tfo_connected_unspec", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &unspec, sizeof unspec);
    CASE("tfo_connected_len1", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, 1);
    CASE("sendto_addr_connected", SYS_sendto, fd, "hi", 2, 0, &other, sizeof other);
    CASE("sendto_addr_connected_len0", SYS_sendto, fd, "hi", 2, 0, &other, 0);
    CASE("sendto_addr_connected_len129", SYS_sendto, fd, "hi", 2, 0, &big, 129);
    CASE("sendto_addr_connected_len_neg1", SYS_sendto, fd, "hi", 2, 0, &other, -1);
    CASE("sendto_addr_connected_unmapped_addr", SYS_sendto, fd, "hi", 2, 0, unmapped, 16);
    CASE("sendto_addr_connected_unmapped_data", SYS_sendto, fd, unmapped, 2, 0, &other, 16);
    CASE("sendto_addr_connected_no_data", SYS_sendto, fd, "hi", 0, 0, &other, 16);
    CASE("sendto_addr_connected_dontwait", SYS_sendto, fd, "hi", 2, MSG_DONTWAIT, &other, 16);
    close(fd);

    /* Not connected: EPIPE, and SIGPIPE unless MSG_NOSIGNAL. */
    CASE("tfo_listening", SYS_sendto, l, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    CASE("sendto_addr_listening_nosignal", SYS_sendto, l, "hi", 2, MSG_NOSIGNAL, &other, 16);
    {
        sigpipes = 0;
        int e;
        long r = SYS(e, SYS_sendto, l, "hi", 2, 0, &other, 16);
        report("sendto_addr_listening", r, e, "sigpipes=%d", (int)sigpipes);
    }
    fd = tcp(AF_INET);
    CASE("sendto_addr_fresh_nosignal", SYS_sendto, fd, "hi", 2, MSG_NOSIGNAL, &other, 16);
    close(fd);
    fd = tcp(AF_INET);
    {
        struct sockaddr_in any0 = sin_of((struct in_addr){htonl(INADDR_ANY)}, 0);
        if (syscall(SYS_bind, fd, &any0, sizeof any0))
            die("bind");
    }
    CASE("sendto_addr_bound_nosignal", SYS_sendto, fd, "hi", 2, MSG_NOSIGNAL, &other, 16);
    CASE("tfo_bound_null", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, NULL, 0);
    CASE("tfo_bound_server", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    CASE("tfo_bound_again", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    close(fd);

    /* Non-blocking: EINPROGRESS, the data not sent; once connected, the
     * next Fast Open sends, and the one after is EISCONN. */
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("tfo_nonblocking_server", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    wait_writable(fd);
    CASE("tfo_nonblocking_server_again", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    CASE("tfo_nonblocking_server_third", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
    close(fd);
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("tfo_nonblocking_closed_port", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &closed,
         sizeof closed);
    close(fd);
    fd = tcp(AF_INET);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    CASE("tfo_nonblocking_egress", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &egress,
         sizeof egress);
    close(fd);

    /* UDP ignores the flag. */
    fd = socket(AF_INET, SOCK_DGRAM, 0);
    CASE("udp_tfo", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &udp_dst, sizeof udp_dst);
    CASE("udp_addr", SYS_sendto, fd, "hi", 2, 0, &udp_dst, sizeof udp_dst);
    close(fd);

    /* sendmsg: the msghdr, its name, its iovecs. */
    struct iovec iov[2] = {{"he", 2}, {"llo", 3}};
    struct msghdr m;
    unsigned char control[16];
    memset(control, 0, sizeof control);
#define MSG(name, flags, ...)                                             \
    do {                                                                  \
        memset(&m, 0, sizeof m);                                          \
        m.msg_name = &srv;                                                \
        m.msg_namelen = sizeof srv;                                       \
        m.msg_iov = iov;                                                  \
        m.msg_iovlen = 2;                                                 \
        __VA_ARGS__;                                                      \
        fd = tcp(AF_INET);                                                \
        CASE(name, SYS_sendmsg, fd, &m, flags);                           \
        close(fd);                                                        \
    } while (0)
    MSG("sendmsg_tfo_server", MSG_FASTOPEN, (void)0);
    MSG("sendmsg_tfo_namelen_neg1", MSG_FASTOPEN, m.msg_namelen = -1);
    MSG("sendmsg_tfo_namelen200", MSG_FASTOPEN, (m.msg_name = &big, m.msg_namelen = 200));
    MSG("sendmsg_tfo_namelen0", MSG_FASTOPEN, m.msg_namelen = 0);
    MSG("sendmsg_tfo_null_name", MSG_FASTOPEN, m.msg_name = NULL);
    MSG("sendmsg_tfo_unmapped_name", MSG_FASTOPEN, m.msg_name = unmapped);
    MSG("sendmsg_tfo_iovlen1025", MSG_FASTOPEN, m.msg_iovlen = 1025);
    MSG("sendmsg_tfo_unmapped_iov", MSG_FASTOPEN, m.msg_iov = (struct iovec *)unmapped);
    MSG("sendmsg_tfo_no_iov", MSG_FASTOPEN, (m.msg_iov = NULL, m.msg_iovlen = 0));
    MSG("sendmsg_tfo_compat_flag", MSG_FASTOPEN | MSG_CMSG_COMPAT, (void)0);
    MSG("sendmsg_tfo_control", MSG_FASTOPEN,
        (m.msg_control = control, m.msg_controllen = sizeof control));
    MSG("sendmsg_tfo_closed_port", MSG_FASTOPEN, m.msg_name = &closed);
    MSG("sendmsg_tfo_egress", MSG_FASTOPEN, m.msg_name = &egress);
    fd = tcp(AF_INET);
    CASE("sendmsg_tfo_unmapped_msghdr", SYS_sendmsg, fd, unmapped, MSG_FASTOPEN);
    close(fd);
    {
        struct iovec bad[2] = {{"he", 2}, {"llo", (size_t)-1}};
        MSG("sendmsg_tfo_negative_iov_len", MSG_FASTOPEN, m.msg_iov = bad);
    }
#undef MSG

    /* sendmmsg: the first message connects and is sent; the second finds
     * the socket connected (EISCONN), and the count is 1. */
    struct mmsghdr mm[2];
    memset(mm, 0, sizeof mm);
    for (int i = 0; i < 2; i++) {
        mm[i].msg_hdr.msg_name = &srv;
        mm[i].msg_hdr.msg_namelen = sizeof srv;
        mm[i].msg_hdr.msg_iov = iov;
        mm[i].msg_hdr.msg_iovlen = 2;
        mm[i].msg_len = 0xeeeeeeee;
    }
    fd = tcp(AF_INET);
    {
        int e;
        long r = SYS(e, SYS_sendmmsg, fd, mm, 2, MSG_FASTOPEN);
        report("sendmmsg_tfo_server", r, e, "len0=%u len1=%s", mm[0].msg_len,
               mm[1].msg_len == 0xeeeeeeee ? "untouched" : "written");
    }
    close(fd);
    fd = tcp(AF_INET);
    CASE("sendmmsg_tfo_vlen0", SYS_sendmmsg, fd, mm, 0, MSG_FASTOPEN);
    CASE("sendmmsg_tfo_unmapped", SYS_sendmmsg, fd, unmapped, 2, MSG_FASTOPEN);
    CASE("sendmmsg_tfo_compat_flag", SYS_sendmmsg, fd, mm, 2, MSG_FASTOPEN | MSG_CMSG_COMPAT);
    close(fd);
    signal(SIGPIPE, SIG_DFL);
}

/* Each call on an fd that is not a socket, and on one that is not open. */
static void fd_cases(void)
{
    int p[2];
    if (pipe(p))
        die("pipe");
    struct sockaddr_in srv = sin_of(server_ip, port);
    unsigned char buf[32];
    int n = 16, one = 1;
    struct iovec iov = {"hi", 2};
    struct msghdr m = {.msg_name = &srv, .msg_namelen = sizeof srv, .msg_iov = &iov,
                       .msg_iovlen = 1};
    struct mmsghdr mm = {.msg_hdr = m};
    struct {
        const char *name;
        long fd;
    } fds[] = {{"pipe", p[0]}, {"closed", 9999}, {"neg1", -1}, {"intmax", 0x7fffffff}};
    char name[80];
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        long fd = fds[i].fd;
        const char *what = fds[i].name;
#define FD_CASE(call, ...)                                                \
    do {                                                                  \
        snprintf(name, sizeof name, "%s_%s", call, what);                 \
        n = 16;                                                           \
        CASE(name, __VA_ARGS__);                                          \
    } while (0)
        FD_CASE("connect", SYS_connect, fd, &srv, sizeof srv);
        FD_CASE("connect_null_addr", SYS_connect, fd, NULL, 16);
        FD_CASE("connect_len129", SYS_connect, fd, &srv, 129);
        FD_CASE("bind", SYS_bind, fd, &srv, sizeof srv);
        FD_CASE("bind_null_addr", SYS_bind, fd, NULL, 16);
        FD_CASE("accept", SYS_accept, fd, NULL, NULL);
        FD_CASE("accept4_bad_flags", SYS_accept4, fd, NULL, NULL, 0x40);
        FD_CASE("getsockname", SYS_getsockname, fd, buf, &n);
        FD_CASE("getsockname_null_len", SYS_getsockname, fd, buf, NULL);
        FD_CASE("getpeername", SYS_getpeername, fd, buf, &n);
        FD_CASE("setsockopt", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, 4);
        FD_CASE("setsockopt_len_neg1", SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, -1);
        FD_CASE("getsockopt", SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, buf, &n);
        FD_CASE("getsockopt_null_optlen", SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, buf,
                NULL);
        FD_CASE("getsockopt_so_domain", SYS_getsockopt, fd, SOL_SOCKET, SO_DOMAIN, buf, &n);
        FD_CASE("sendto_tfo", SYS_sendto, fd, "hi", 2, MSG_FASTOPEN, &srv, sizeof srv);
        FD_CASE("sendto_addr", SYS_sendto, fd, "hi", 2, MSG_NOSIGNAL, &srv, sizeof srv);
        FD_CASE("sendmsg_tfo", SYS_sendmsg, fd, &m, MSG_FASTOPEN);
        FD_CASE("sendmmsg_tfo", SYS_sendmmsg, fd, &mm, 1, MSG_FASTOPEN);
    }
    close(p[0]);
    close(p[1]);
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr,
                "usage: %s SERVER_IP PORT SELF_IP SELF_PORT SELF6_PORT CLOSED_PORT EGRESS_IP "
                "EGRESS_PORT\n",
                argv[0]);
        return 2;
    }
    if (!inet_aton(argv[1], &server_ip) || !inet_aton(argv[3], &self_ip) ||
        !inet_aton(argv[7], &egress_ip)) {
        fprintf(stderr, "hostile: bad IPv4 address\n");
        return 2;
    }
    port = atoi(argv[2]);
    self_port = atoi(argv[4]);
    self6_port = atoi(argv[5]);
    closed_port = atoi(argv[6]);
    egress_port = atoi(argv[8]);
    setup_memory();

    int l = listener(AF_INET, self_port);
    int l6 = listener(AF_INET6, self6_port);
    connect_cases();
    listening_cases(l);
    bind_cases(l);
    accept_cases(l, l6);
    name_cases(l, l6);
    sockopt_cases(l6);
    sweep_cases(l, l6);
    fd_cases();
    send_cases(l);
    close(l);
    close(l6);
    printf("DONE\n");
    return 0;
}

/*
 * notify_floor: the cost of a seccomp user notification with nothing done
 * in it, the floor under every trapped call of ax (scripts/bench.sh's
 * "floor" row).
 *
 *   notify_floor CALLS SYNC(0|1)
 *
 * A child installs a filter that traps getppid (SECCOMP_RET_USER_NOTIF) and
 * makes CALLS of them; the parent, the supervisor, answers each with
 * SECCOMP_IOCTL_NOTIF_RECV and _SEND and nothing else (poll first, as ax's
 * receive loop does). With SYNC=1 the listener gets
 * SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (Linux 6.6), as ax's does. Prints
 * "<supervisor CPU µs per call> <caller wall µs per call> <sync 0|1>".
 */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void send_fd(int sock, int fd) {
    char byte = 0, space[CMSG_SPACE(sizeof(int))];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = space,
                       .msg_controllen = sizeof space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &m, 0) != 1) die("sendmsg");
}

static int recv_fd(int sock) {
    char byte, space[CMSG_SPACE(sizeof(int))];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = space,
                       .msg_controllen = sizeof space};
    if (recvmsg(sock, &m, 0) != 1) die("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c || c->cmsg_type != SCM_RIGHTS) die("no fd");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: notify_floor CALLS SYNC(0|1)\n");
        return 2;
    }
    long calls = atol(argv[1]);
    int sync = atoi(argv[2]);
    int sv[2], report[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(report)) die("socketpair");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("no_new_privs");
        int fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                         SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
        if (fd < 0) die("seccomp");
        send_fd(sv[0], fd);
        close(fd);
        char go;
        if (read(sv[0], &go, 1) != 1) die("read");
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < calls; i++) syscall(SYS_getppid);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double wall = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        if (write(report[1], &wall, sizeof wall) != sizeof wall) die("write");
        _exit(0);
    }
    int fd = recv_fd(sv[1]);
    if (sync) {
        __u64 flags = SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP;
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags, 0)) sync = 0;
    }
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    if (write(sv[1], "g", 1) != 1) die("write");
    for (long i = 0; i < calls; i++) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, -1) != 1) die("poll");
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req)) die("recv");
        struct seccomp_notif_resp resp = {.id = req.id, .val = 0};
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp)) die("send");
    }
    getrusage(RUSAGE_SELF, &r1);
    double wall;
    if (read(report[0], &wall, sizeof wall) != sizeof wall) die("read report");
    waitpid(child, NULL, 0);
    double cpu = seconds(r1.ru_utime) - seconds(r0.ru_utime) + seconds(r1.ru_stime) -
                 seconds(r0.ru_stime);
    printf("%.2f %.2f %d\n", cpu / calls * 1e6, wall / calls * 1e6, sync);
    return 0;
}

/*
 * vsock: a netcat for AF_VSOCK stream sockets, for the guest's initramfs.
 *
 *   vsock listen PORT        accept one connection on PORT (any CID)
 *   vsock connect CID PORT   connect to CID:PORT (2 is the host)
 *
 * Then copy stdin to the socket and the socket to stdout until both reach
 * EOF: stdin's EOF becomes shutdown(SHUT_WR), so the peer sees the end of
 * our data and can still answer. Exit status 0 when both directions ended
 * cleanly, 1 on any error (connection refused or reset included), 2 on
 * usage errors.
 *
 * Built static against glibc by guest-images/build.sh:
 *   gcc -Os -static -Wall -Wextra -o vsock vsock.c
 */

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char buf[64 * 1024];

static void usage(void)
{
    fputs("usage: vsock listen PORT\n       vsock connect CID PORT\n", stderr);
    exit(2);
}

static void die(const char *what)
{
    fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
    exit(1);
}

static unsigned int number(const char *s)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v > UINT_MAX)
        usage();
    return (unsigned int)v;
}

/* Write all of buf[0..n) to fd; 0 on success, -1 on error. */
static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void copy(int sock)
{
    int in_open = 1, sock_open = 1;

    while (in_open || sock_open) {
        struct pollfd p[2] = {
            { .fd = in_open ? 0 : -1, .events = POLLIN },
            { .fd = sock_open ? sock : -1, .events = POLLIN },
        };
        ssize_t n;

        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (in_open && (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            n = read(0, buf, sizeof buf);
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                die("read stdin");
            if (n == 0) {
                in_open = 0;
                if (shutdown(sock, SHUT_WR) < 0 && errno != ENOTCONN)
                    die("shutdown");
            } else if (n > 0 && write_all(sock, buf, (size_t)n) < 0) {
                die("write socket");
            }
        }
        if (sock_open && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            n = read(sock, buf, sizeof buf);
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                die("read socket");
            if (n == 0)
                sock_open = 0;
            else if (n > 0 && write_all(1, buf, (size_t)n) < 0)
                die("write stdout");
        }
    }
}

int main(int argc, char **argv)
{
    struct sockaddr_vm addr;
    int sock;

    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        int lsock;

        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = number(argv[2]);
        lsock = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lsock < 0)
            die("socket");
        if (bind(lsock, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("bind");
        if (listen(lsock, 1) < 0)
            die("listen");
        do
            sock = accept(lsock, NULL, NULL);
        while (sock < 0 && errno == EINTR);
        if (sock < 0)
            die("accept");
        close(lsock);
    } else if (argc == 4 && strcmp(argv[1], "connect") == 0) {
        addr.svm_cid = number(argv[2]);
        addr.svm_port = number(argv[3]);
        sock = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (sock < 0)
            die("socket");
        if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("connect");
    } else {
        usage();
    }
    copy(sock);
    if (close(sock) < 0)
        die("close");
    return 0;
}

/*
 * outb [-d] [PORT VALUE]: guest-side helper of /usr/bin/vmm-exit.
 *
 *   -d          first wait (at most 3 s) until the console's output queue is
 *               empty, so that nothing written to /dev/console is lost when
 *               the vmm ends the guest right after the port write;
 *   PORT VALUE  write the byte VALUE to the x86 I/O port PORT (ioperm +
 *               outb); for kernels without /dev/port (CONFIG_DEVPORT is off
 *               in Debian's cloud kernel).
 *
 * Numbers are decimal or 0x-prefixed hex. Freestanding, no libc:
 * guest-images/build.sh builds it with
 *   gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie ...
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_ioctl 16
#define SYS_nanosleep 35
#define SYS_exit 60
#define SYS_ioperm 173

#define O_RDONLY_NOCTTY_NONBLOCK (00400 | 04000)
#define TIOCOUTQ 0x5411

static long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return r;
}

static void fail(const char *msg)
{
    long len = 0;
    while (msg[len])
        len++;
    sys3(SYS_write, 2, (long)msg, len);
    sys3(SYS_exit, 1, 0, 0);
    for (;;)
        ;
}

static unsigned long parse(const char *s)
{
    unsigned long v = 0, base = 10;
    if (!*s)
        fail("outb: empty number\n");
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        if (!*s)
            fail("outb: bad number\n");
    }
    for (; *s; s++) {
        unsigned long d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            fail("outb: bad number\n");
        if (d >= base)
            fail("outb: bad number\n");
        v = v * base + d;
        if (v > 0xffff)
            fail("outb: number too large\n");
    }
    return v;
}

/* Poll the console's output queue until it is empty (bounded: a console
 * whose transmitter is stuck must not keep the guest from ending). */
static void drain_console(void)
{
    struct {
        long sec, nsec;
    } ms = {0, 1000000};
    int queued, i;
    long fd = sys3(SYS_open, (long)"/dev/console", O_RDONLY_NOCTTY_NONBLOCK, 0);
    if (fd < 0)
        return;
    for (i = 0; i < 3000; i++) {
        if (sys3(SYS_ioctl, fd, TIOCOUTQ, (long)&queued) != 0 || queued <= 0)
            break;
        sys3(SYS_nanosleep, (long)&ms, 0, 0);
    }
    /* The UART's own FIFO: a few more characters. */
    ms.nsec = 5000000;
    sys3(SYS_nanosleep, (long)&ms, 0, 0);
    sys3(SYS_close, fd, 0, 0);
}

__attribute__((noreturn, used)) void outb_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    unsigned long port, val;

    if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'd' && !argv[1][2]) {
        drain_console();
        argc--;
        argv++;
        if (argc == 1)
            sys3(SYS_exit, 0, 0, 0);
    }
    if (argc != 3)
        fail("usage: outb [-d] [PORT VALUE]\n");
    port = parse(argv[1]);
    val = parse(argv[2]);
    if (val > 0xff)
        fail("outb: VALUE must be 0..255\n");
    if (sys3(SYS_ioperm, (long)port, 1, 1) != 0)
        fail("outb: ioperm failed (needs root and CONFIG_X86_IOPL_IOPERM)\n");
    __asm__ volatile("outb %b0, %w1" : : "a"(val), "Nd"(port));
    sys3(SYS_exit, 0, 0, 0);
    for (;;)
        ;
}

__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "    xor %ebp, %ebp\n"
        "    mov %rsp, %rdi\n"
        "    and $-16, %rsp\n"
        "    call outb_main\n"
        "    hlt\n");

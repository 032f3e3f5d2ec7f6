/*
 * hostile ADDR: a hostile virtio driver, for the guest's initramfs.
 *
 * Takes over the virtio-mmio device whose 4 KiB register window starts at
 * guest physical ADDR (e.g. 0xd0001000): unbinds Linux's virtio-mmio driver
 * from it (so Linux never touches it again), maps the window through
 * /dev/mem, builds its own split virtqueue in mlock'd pages of its own
 * (physical addresses from /proc/self/pagemap) and throws malformed
 * configurations, rings and requests at it. Supported devices: virtio-blk
 * (2) and virtio-rng (4). A block device is read (sector 0, through Linux)
 * before it is unbound, to check the device's answers against; no request
 * that could succeed ever writes to the disk, so the disk image must come
 * out unchanged. Then it checks that unassigned MMIO reads as all ones and
 * unassigned I/O ports 0x100-0x1ff read as 0xff.
 *
 * One line per case:  HOSTILE <case> ok <what happened>
 *                 or  HOSTILE <case> FAIL <what happened> (want: ...)
 * and a last line     HOSTILE-SUMMARY device=<blk|rng> cases=N failed=M.
 * Every case that breaks the device ends with a reset (status 0) and a
 * well-formed request that must work again. The expected behaviour is the
 * one README.md ("Untrusted guest input") and devices/src/virtio/ document:
 * a corrupt ring sets DEVICE_NEEDS_RESET (status bit 64, with a
 * configuration-change interrupt) and the device touches that ring no more;
 * a buffer outside RAM fails only its request; FEATURES_OK is refused for
 * feature sets without VERSION_1 or with bits never offered; queue
 * registers are frozen after DRIVER_OK; notifications before DRIVER_OK or
 * for queues that do not exist are ignored.
 *
 * Exit status: 0 if every case behaved as documented, 1 if any did not,
 * 2 on usage errors or if the device cannot be taken over at all.
 * Needs root, CONFIG_DEVMEM (STRICT_DEVMEM is fine: the windows are not
 * RAM), CONFIG_PROC_PAGE_MONITOR and CONFIG_X86_IOPL_IOPERM.
 *
 * Built static against glibc by guest-images/build.sh:
 *   gcc -Os -static -Wall -Wextra -Werror -o hostile hostile.c
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* virtio-mmio registers (virtio 1.x §4.2.2) */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 64u
#define S_UP (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)

#define INT_CONFIG 2u

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4

#define MAGIC 0x74726976u
#define DEV_BLK 2
#define DEV_RNG 4

#define BLK_IN 0
#define BLK_OUT 1

#define PAGE 4096ul
#define POOL_PAGES 4096 /* 16 MiB, where a physically contiguous run is found */
#define RUN_PAGES 17    /* 64 KiB (the rng's fill cap) + one guard page */
#define QSIZE 16        /* the queue size of the well-formed setups */
#define CANARY 0xa5

#define OUTSIDE_RAM (1ull << 40)
#define MMIO_WINDOW0 0xd0000000ull

#define WAIT_MS 5000  /* how long the device gets to answer */
#define QUIET_MS 300  /* how long it must stay silent when it should */

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct page {
    uint8_t *va;
    uint64_t pa;
};

static volatile uint8_t *win;
static uint64_t win_pa;
static uint32_t devid, qmax;
static int devmem = -1;

static struct page pool[POOL_PAGES];
static int taken[POOL_PAGES];
static struct page run[RUN_PAGES];
static int have_run;

/* The queue the cases use: one page per ring, buffers in pages of their own. */
static struct page p_desc, p_avail, p_used, p_buf, p_hdr, p_buf2;
static uint16_t qsize, next_avail;
static uint64_t ram_end; /* end of the highest "System RAM" range */

static uint8_t sector0[512];
static int have_sector0;

static int cases, failures;

/* ---------------------------------------------------------------------- */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("hostile: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void report(const char *name, int ok, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    cases++;
    if (!ok)
        failures++;
    printf("HOSTILE %s %s %s\n", name, ok ? "ok" : "FAIL", what);
    fflush(stdout);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static uint32_t rd(uint32_t off)
{
    return *(volatile uint32_t *)(win + off);
}

static void wr(uint32_t off, uint32_t v)
{
    *(volatile uint32_t *)(win + off) = v;
}

static void barrier(void)
{
    __sync_synchronize();
}

/* ---------------------------------------------------------------------- */
/* Taking the device over. */

/* The platform device whose memory resource is exactly the window, from /proc/iomem. */
static int platform_name(uint64_t base, char *name, size_t len)
{
    FILE *f = fopen("/proc/iomem", "r");
    char line[256];
    int found = 0;
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long long s, e;
        char n[128], path[256];
        if (sscanf(line, " %llx-%llx : %127[^\n]", &s, &e, n) != 3)
            continue;
        if (s != base || e != base + PAGE - 1)
            continue;
        snprintf(path, sizeof path, "/sys/bus/platform/devices/%s", n);
        if (access(path, F_OK) == 0) {
            snprintf(name, len, "%s", n);
            found = 1;
        }
    }
    fclose(f);
    return found;
}

/* The highest "System RAM" address + 1, from /proc/iomem. */
static uint64_t find_ram_end(void)
{
    FILE *f = fopen("/proc/iomem", "r");
    char line[256];
    uint64_t end = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long long s, e;
        char n[128];
        if (sscanf(line, "%llx-%llx : %127[^\n]", &s, &e, n) == 3 &&
            strcmp(n, "System RAM") == 0 && e + 1 > end)
            end = e + 1;
    }
    fclose(f);
    return end;
}

static void write_file(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, s, strlen(s)) != (ssize_t)strlen(s))
        die("cannot write '%s' to %s: %s", s, path, strerror(errno));
    close(fd);
}

/* Read sector 0 of the block device Linux made of it, then unbind the driver. */
static void take_over(uint64_t base)
{
    char name[128], path[512];
    glob_t g;
    if (!platform_name(base, name, sizeof name)) {
        printf("HOSTILE-INFO no platform device at %#llx in /proc/iomem: "
               "driving it as it is\n", (unsigned long long)base);
        return;
    }
    snprintf(path, sizeof path, "/sys/bus/platform/devices/%s/virtio*/block/*", name);
    if (glob(path, 0, NULL, &g) == 0 && g.gl_pathc > 0) {
        const char *disk = strrchr(g.gl_pathv[0], '/') + 1;
        char dev[128];
        int fd;
        snprintf(dev, sizeof dev, "/dev/%s", disk);
        fd = open(dev, O_RDONLY);
        if (fd >= 0 && pread(fd, sector0, 512, 0) == 512)
            have_sector0 = 1;
        if (fd >= 0)
            close(fd);
        printf("HOSTILE-INFO %s is %s; sector 0 %s\n", name, dev,
               have_sector0 ? "read" : "unreadable");
    }
    globfree(&g);
    snprintf(path, sizeof path, "/sys/bus/platform/devices/%s/driver", name);
    if (access(path, F_OK) == 0) {
        snprintf(path, sizeof path, "/sys/bus/platform/devices/%s/driver/unbind", name);
        write_file(path, name);
        printf("HOSTILE-INFO unbound %s from its driver\n", name);
    }
    fflush(stdout);
}

static volatile uint8_t *map_phys(uint64_t pa)
{
    void *p;
    if (devmem < 0) {
        devmem = open("/dev/mem", O_RDWR | O_SYNC);
        if (devmem < 0)
            die("/dev/mem: %s (needs root and CONFIG_DEVMEM)", strerror(errno));
    }
    p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, devmem, (off_t)pa);
    if (p == MAP_FAILED)
        return NULL;
    return p;
}

static int cmp_pa(const void *a, const void *b)
{
    const struct page *x = a, *y = b;
    return x->pa < y->pa ? -1 : x->pa > y->pa;
}

/* mlock'd pages with their physical addresses; one physically contiguous run. */
static void make_pool(void)
{
    uint8_t *mem = mmap(NULL, POOL_PAGES * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    static struct page sorted[POOL_PAGES];
    int fd, i, j;
    if (mem == MAP_FAILED)
        die("mmap pool: %s", strerror(errno));
    if (mlock(mem, POOL_PAGES * PAGE) != 0)
        die("mlock: %s", strerror(errno));
    fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        die("/proc/self/pagemap: %s (needs CONFIG_PROC_PAGE_MONITOR)", strerror(errno));
    for (i = 0; i < POOL_PAGES; i++) {
        uint64_t e;
        uint8_t *va = mem + i * PAGE;
        va[0] = 1;
        if (pread(fd, &e, 8, (off_t)((uintptr_t)va / PAGE * 8)) != 8)
            die("pagemap read: %s", strerror(errno));
        if (!(e >> 63) || (e & ((1ull << 55) - 1)) == 0)
            die("pagemap gives no frame for a locked page (not root?)");
        pool[i].va = va;
        pool[i].pa = (e & ((1ull << 55) - 1)) * PAGE;
    }
    close(fd);
    memcpy(sorted, pool, sizeof sorted);
    qsort(sorted, POOL_PAGES, sizeof sorted[0], cmp_pa);
    for (i = 0; i + RUN_PAGES <= POOL_PAGES && !have_run; i++) {
        for (j = 1; j < RUN_PAGES; j++)
            if (sorted[i + j].pa != sorted[i].pa + j * PAGE)
                break;
        if (j == RUN_PAGES) {
            have_run = 1;
            memcpy(run, &sorted[i], sizeof run);
        }
    }
    /* The run's pages are not handed out for anything else. */
    for (i = 0; i < POOL_PAGES; i++)
        for (j = 0; have_run && j < RUN_PAGES; j++)
            if (pool[i].pa == run[j].pa)
                taken[i] = 1;
}

static struct page take_page(void)
{
    int i;
    for (i = 0; i < POOL_PAGES; i++)
        if (!taken[i]) {
            taken[i] = 1;
            return pool[i];
        }
    die("page pool exhausted");
    return pool[0];
}

/* ---------------------------------------------------------------------- */
/* Driving the device. */

#define DESC ((struct desc *)p_desc.va)
#define AVAIL ((volatile uint16_t *)p_avail.va)               /* flags, idx, ring[] */
#define USED_IDX (*(volatile uint16_t *)(p_used.va + 2))
#define USED_ID(i) (*(volatile uint32_t *)(p_used.va + 4 + 8 * (i)))
#define USED_LEN(i) (*(volatile uint32_t *)(p_used.va + 8 + 8 * (i)))
#define HDR_STATUS (p_hdr.va + 2048) /* blk status byte */
#define HDR_STATUS_PA (p_hdr.pa + 2048)

static void set_desc(int i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    DESC[i].addr = addr;
    DESC[i].len = len;
    DESC[i].flags = flags;
    DESC[i].next = next;
}

static void clear_memory(void)
{
    memset(p_desc.va, 0, PAGE);
    memset(p_avail.va, 0, PAGE);
    memset(p_used.va, 0, PAGE);
    memset(p_buf.va, CANARY, PAGE);
    memset(p_buf2.va, CANARY, PAGE);
    memset(p_hdr.va, 0, PAGE);
    AVAIL[0] = 1; /* VRING_AVAIL_F_NO_INTERRUPT: nobody handles the line */
    next_avail = 0;
    barrier();
}

/* Reset, ACKNOWLEDGE, DRIVER, driver features; returns the status after FEATURES_OK. */
static uint32_t begin(uint32_t feat_lo, uint32_t feat_hi)
{
    wr(R_STATUS, 0);
    wr(R_INTERRUPT_ACK, 0xffffffff);
    clear_memory();
    wr(R_STATUS, S_ACK);
    wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, feat_hi);
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, feat_lo);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    return rd(R_STATUS);
}

static void setup_queue(uint32_t size, uint64_t desc, uint64_t avail, uint64_t used)
{
    wr(R_QUEUE_SEL, 0);
    wr(R_QUEUE_NUM, size);
    wr(R_QUEUE_DESC_LOW, (uint32_t)desc);
    wr(R_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    wr(R_QUEUE_DRIVER_LOW, (uint32_t)avail);
    wr(R_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    wr(R_QUEUE_DEVICE_LOW, (uint32_t)used);
    wr(R_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    wr(R_QUEUE_READY, 1);
    qsize = (uint16_t)size;
}

/* A correct bring-up with queue 0 of QSIZE entries; returns the status. */
static uint32_t up(void)
{
    begin(0, 1 /* VERSION_1 */);
    setup_queue(QSIZE, p_desc.pa, p_avail.pa, p_used.pa);
    wr(R_STATUS, S_UP);
    return rd(R_STATUS);
}

static void submit(uint16_t head)
{
    AVAIL[2 + next_avail % qsize] = head;
    barrier();
    next_avail++;
    AVAIL[1] = next_avail;
    barrier();
}

static void kick(uint32_t q)
{
    wr(R_QUEUE_NOTIFY, q);
}

static int wait_used(uint16_t n, long ms)
{
    long end = now_ms() + ms;
    for (;;) {
        barrier();
        if (USED_IDX == n)
            return 1;
        if (now_ms() > end)
            return 0;
        usleep(200);
    }
}

static int wait_status(uint32_t bit, long ms)
{
    long end = now_ms() + ms;
    for (;;) {
        if (rd(R_STATUS) & bit)
            return 1;
        if (now_ms() > end)
            return 0;
        usleep(200);
    }
}

static int all_canary(const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (p[i] != CANARY)
            return 0;
    return 1;
}

/* Descriptors of a well-formed request at [first, first + 3); returns the head. */
static uint16_t good_request(int first)
{
    if (devid == DEV_RNG) {
        memset(p_buf.va, CANARY, 128);
        set_desc(first, p_buf.pa, 64, D_WRITE, 0);
    } else {
        memset(p_buf.va, CANARY, 512);
        memset(p_hdr.va, 0, 16); /* IN, sector 0 */
        *HDR_STATUS = 0xff;
        set_desc(first, p_hdr.pa, 16, D_NEXT, (uint16_t)(first + 1));
        set_desc(first + 1, p_buf.pa, 512, D_WRITE | D_NEXT, (uint16_t)(first + 2));
        set_desc(first + 2, HDR_STATUS_PA, 1, D_WRITE, 0);
    }
    barrier();
    return (uint16_t)first;
}

/* Whether used element `slot` is the correct answer to good_request(head). */
static int good_answer(int slot, uint16_t head, char *why, size_t len)
{
    uint32_t id = USED_ID(slot), n = USED_LEN(slot);
    barrier();
    if (id != head) {
        snprintf(why, len, "used id %u, want %u", id, head);
        return 0;
    }
    if (devid == DEV_RNG) {
        if (n != 64 || all_canary(p_buf.va, 64) || !all_canary(p_buf.va + 64, 64)) {
            snprintf(why, len, "rng answer len %u, bytes %s, beyond %s", n,
                     all_canary(p_buf.va, 64) ? "unwritten" : "written",
                     all_canary(p_buf.va + 64, 64) ? "intact" : "overwritten");
            return 0;
        }
    } else {
        if (n != 513 || *HDR_STATUS != 0 || memcmp(p_buf.va, sector0, 512) != 0) {
            snprintf(why, len, "blk read len %u status %u data %s", n, *HDR_STATUS,
                     memcmp(p_buf.va, sector0, 512) ? "differs from sector 0" : "right");
            return 0;
        }
    }
    snprintf(why, len, "good request answered");
    return 1;
}

/* Submit a well-formed request on the running queue and check the answer. */
static int works(char *why, size_t len)
{
    uint16_t head = good_request(QSIZE - 3);
    uint16_t want = (uint16_t)(next_avail + 1);
    submit(head);
    kick(0);
    if (!wait_used(want, WAIT_MS)) {
        snprintf(why, len, "no answer to a good request (used idx %u, status %#x)",
                 USED_IDX, rd(R_STATUS));
        return 0;
    }
    return good_answer((uint16_t)(want - 1) % qsize, head, why, len);
}

/* Reset, set up correctly, and check that a well-formed request works. */
static int recovers(char *why, size_t len)
{
    uint32_t st;
    wr(R_STATUS, 0);
    if (rd(R_STATUS) != 0) {
        snprintf(why, len, "status %#x after reset", rd(R_STATUS));
        return 0;
    }
    st = up();
    if (st != S_UP) {
        snprintf(why, len, "status %#x after a correct bring-up", st);
        return 0;
    }
    return works(why, len);
}

/* ---------------------------------------------------------------------- */
/* Cases. */

static void case_baseline(void)
{
    char why[200];
    int ok = recovers(why, sizeof why);
    report("baseline", ok, "%s", why);
}

/* A broken ring: DEVICE_NEEDS_RESET (+ config interrupt), nothing used, the ring is
 * not touched any more (a good request after it stays unanswered), the bit cannot
 * be cleared except by reset, and a reset brings the device back. */
static void expect_needs_reset(const char *name, int kicked)
{
    char why[200];
    int nr = wait_status(S_NEEDS_RESET, WAIT_MS);
    uint32_t isr = rd(R_INTERRUPT_STATUS);
    uint16_t used = USED_IDX;
    int quiet = -1, sticky, rec;
    uint32_t st = rd(R_STATUS);
    if (nr && kicked) {
        uint16_t head = good_request(QSIZE - 3);
        submit(head);
        kick(0);
        sleep_ms(QUIET_MS);
        quiet = USED_IDX == used;
    }
    wr(R_STATUS, st & ~S_NEEDS_RESET); /* taking the bit away is ignored */
    sticky = (rd(R_STATUS) & S_NEEDS_RESET) != 0;
    wr(R_INTERRUPT_ACK, isr);
    rec = recovers(why, sizeof why);
    report(name, nr && (isr & INT_CONFIG) && used == 0 && quiet != 0 && sticky && rec,
           "needs_reset=%d config_irq=%d used=%u %s sticky=%d recovered=%d%s%s", nr,
           !!(isr & INT_CONFIG), used,
           quiet < 0 ? "" : quiet ? "later-request-ignored=1" : "later-request-ignored=0",
           sticky, rec, rec ? "" : ": ", rec ? "" : why);
}

static void case_ring(const char *name, void (*build)(void), uint16_t head, uint16_t avail_idx)
{
    up();
    build();
    AVAIL[2] = head;
    barrier();
    next_avail = avail_idx;
    AVAIL[1] = avail_idx;
    barrier();
    kick(0);
    expect_needs_reset(name, 1);
}

static void build_loop(void)
{
    set_desc(0, p_buf.pa, 32, D_WRITE | D_NEXT, 1);
    set_desc(1, p_buf.pa + 32, 32, D_WRITE | D_NEXT, 0);
}

static void build_whole_table(void)
{
    int i;
    for (i = 0; i < QSIZE; i++)
        set_desc(i, p_buf.pa + 16 * i, 16, D_WRITE | D_NEXT, (uint16_t)((i + 1) % QSIZE));
}

static void build_next_out_of_range(void)
{
    set_desc(0, p_buf.pa, 32, D_WRITE | D_NEXT, 0xffff);
}

static void build_single(void)
{
    set_desc(0, p_buf.pa, 32, D_WRITE, 0);
}

static void build_indirect(void)
{
    set_desc(0, p_buf2.pa, 32, D_INDIRECT, 0);
    set_desc(1, p_buf.pa, 32, D_WRITE, 0); /* what the indirect table would hold */
    memcpy(p_buf2.va, &DESC[1], sizeof(struct desc));
}

static void build_readable_after_writable(void)
{
    set_desc(0, p_buf.pa, 32, D_WRITE | D_NEXT, 1);
    set_desc(1, p_buf2.pa, 32, D_NEXT, 2);
    set_desc(2, p_buf.pa + 64, 32, D_WRITE, 0);
}

/* Bad queue configuration: refused (DEVICE_NEEDS_RESET) when DRIVER_OK is set. */
static void case_config(const char *name, uint32_t size, uint64_t desc, uint64_t avail,
                        uint64_t used)
{
    begin(0, 1);
    setup_queue(size, desc, avail, used);
    wr(R_STATUS, S_UP);
    qsize = QSIZE;
    expect_needs_reset(name, 0);
}

/* One request with its own descriptors; what the device must answer. */
struct bad_req {
    const char *name;
    uint32_t type;     /* blk: request type */
    uint64_t sector;   /* blk: first sector */
    uint32_t hdr_len;  /* blk: length of the header descriptor (0: 16) */
    uint64_t a_addr;   /* first data buffer (or BUF, RUN, OWN) */
    uint32_t a_len;
    uint64_t b_addr;   /* optional second data buffer */
    uint32_t b_len;
    int status;        /* blk: status byte ST_OK, ST_OUTSIDE (1<<40), ST_EMPTY (len 0) */
    uint32_t want_len; /* used length */
    int want_status;   /* blk status byte, -1: not written */
    int a_touched;     /* whether the buffer in our page may change */
};

#define ST_OK 0
#define ST_OUTSIDE 1
#define ST_EMPTY 2

#define BUF (1ull) /* marker: "our own data page" for a_addr */
#define RUN (2ull) /* marker: "the contiguous run" */
#define OWN (3ull) /* marker: "the device's own register window" */

static void case_request(const struct bad_req *r)
{
    char why[200] = "";
    uint64_t a = r->a_addr == BUF   ? p_buf.pa
                 : r->a_addr == RUN ? run[0].pa
                 : r->a_addr == OWN ? win_pa
                                    : r->a_addr;
    uint16_t n = 0;
    uint32_t len;
    int ok, nr, st = -1, a_intact, rest_ok = 1, still = 0, good;
    if (r->a_addr == RUN && !have_run) {
        report(r->name, 0, "no %d physically contiguous pages in a %d-page pool", RUN_PAGES,
               POOL_PAGES);
        return;
    }
    up();
    if (r->a_addr == RUN) {
        int i;
        for (i = 0; i < RUN_PAGES; i++)
            memset(run[i].va, CANARY, PAGE);
    }
    if (devid == DEV_BLK) {
        uint32_t *h = (uint32_t *)p_hdr.va;
        h[0] = r->type;
        h[1] = 0;
        memcpy(p_hdr.va + 8, &r->sector, 8);
        *HDR_STATUS = 0xff;
        set_desc(n, p_hdr.pa, r->hdr_len ? r->hdr_len : 16, D_NEXT, (uint16_t)(n + 1));
        n++;
    }
    {
        uint16_t w = r->type == BLK_OUT && devid == DEV_BLK ? 0 : D_WRITE;
        set_desc(n, a, r->a_len, (uint16_t)(w | D_NEXT), (uint16_t)(n + 1));
        n++;
        if (r->b_len) {
            set_desc(n, r->b_addr, r->b_len, (uint16_t)(w | D_NEXT), (uint16_t)(n + 1));
            n++;
        }
    }
    if (devid == DEV_BLK) {
        set_desc(n, r->status == ST_OUTSIDE ? OUTSIDE_RAM : HDR_STATUS_PA,
                 r->status == ST_EMPTY ? 0 : 1, D_WRITE, 0);
        n++;
    }
    DESC[n - 1].flags &= (uint16_t)~D_NEXT;
    barrier();
    submit(0);
    kick(0);
    ok = wait_used(1, WAIT_MS);
    nr = (rd(R_STATUS) & S_NEEDS_RESET) != 0;
    len = ok ? USED_LEN(0) : 0xdeadbeef;
    if (devid == DEV_BLK && *HDR_STATUS != 0xff)
        st = *HDR_STATUS;
    if (r->a_addr == RUN) {
        /* The first 64 KiB written, the guard page after them not. */
        int i;
        for (i = 0; i < RUN_PAGES - 1; i++)
            if (all_canary(run[i].va, PAGE))
                rest_ok = 0;
        a_intact = all_canary(run[RUN_PAGES - 1].va, PAGE);
        rest_ok = rest_ok && a_intact;
    } else {
        a_intact = r->a_addr == BUF ? all_canary(p_buf.va, PAGE) : 1;
    }
    /* The queue is still usable without a reset. */
    if (!ok)
        snprintf(why, sizeof why, "no answer (status %#x)", rd(R_STATUS));
    else if (nr)
        snprintf(why, sizeof why, "device needs reset");
    else
        still = works(why, sizeof why);
    good = still && len == r->want_len && st == r->want_status && rest_ok &&
           (r->a_touched || a_intact);
    wr(R_STATUS, 0);
    report(r->name, good, "used_len=%u status=%d buffer=%s, then %s", len, st,
           r->a_addr == RUN ? (rest_ok ? "first-64KiB-written-guard-intact" : "WRONG")
                            : (a_intact ? "intact" : "written"),
           why);
}

static void case_notify_before_driver_ok(void)
{
    char why[200];
    uint16_t head;
    uint32_t st;
    int quiet, ok, rec;
    st = begin(0, 1);
    setup_queue(QSIZE, p_desc.pa, p_avail.pa, p_used.pa);
    head = good_request(0);
    submit(head);
    kick(0);
    kick(0);
    sleep_ms(QUIET_MS);
    quiet = USED_IDX == 0 && rd(R_STATUS) == st;
    wr(R_STATUS, S_UP);
    kick(0);
    ok = wait_used(1, WAIT_MS) && good_answer(0, head, why, sizeof why);
    rec = recovers(why, sizeof why);
    report("notify-before-driver-ok", quiet && ok && rec,
           "ignored=%d answered_after_driver_ok=%d recovered=%d (%s)", quiet, ok, rec, why);
}

static void case_notify_missing_queue(void)
{
    static const uint32_t qs[] = {99, 1, 2, 0xffff, 0x10000, 0xffffffff};
    char why[200];
    uint16_t head;
    unsigned i;
    int quiet, ok;
    up();
    head = good_request(0);
    submit(head);
    for (i = 0; i < sizeof qs / sizeof qs[0]; i++)
        kick(qs[i]);
    sleep_ms(QUIET_MS);
    quiet = USED_IDX == 0 && rd(R_STATUS) == S_UP;
    kick(0);
    ok = wait_used(1, WAIT_MS) && good_answer(0, head, why, sizeof why);
    report("notify-missing-queue", quiet && ok,
           "queues 99,1,2,0xffff,0x10000,0xffffffff ignored=%d status=%#x queue0=%d (%s)",
           quiet, rd(R_STATUS), ok, why);
}

/* Register accesses per storm case. */
#define STORM 10000

static void case_notify_storm(void)
{
    char why[200];
    long t0 = now_ms();
    int i, ok;
    up();
    for (i = 0; i < STORM; i++)
        kick(0);
    for (i = 0; i < STORM / 10; i++)
        kick(99);
    ok = rd(R_STATUS) == S_UP && works(why, sizeof why);
    report("notify-storm", ok, "%d kicks of an empty queue 0, %d of queue 99 in %ld ms, "
           "status=%#x, then %s", STORM, STORM / 10, now_ms() - t0, rd(R_STATUS), why);
}

static void case_frozen(void)
{
    char why[200];
    int frozen, ok;
    up();
    wr(R_QUEUE_NUM, qsize * 2);
    wr(R_QUEUE_NUM, 3);
    wr(R_QUEUE_DESC_LOW, 0xdead0000);
    wr(R_QUEUE_DESC_HIGH, 0x100);
    wr(R_QUEUE_DRIVER_LOW, (uint32_t)MMIO_WINDOW0);
    wr(R_QUEUE_DEVICE_LOW, (uint32_t)MMIO_WINDOW0 + 0x100);
    wr(R_QUEUE_READY, 0);
    wr(R_STATUS, S_ACK); /* bits cannot be taken away but by reset */
    frozen = rd(R_QUEUE_NUM) == QSIZE && rd(R_QUEUE_DESC_LOW) == (uint32_t)p_desc.pa &&
             rd(R_QUEUE_DESC_HIGH) == (uint32_t)(p_desc.pa >> 32) &&
             rd(R_QUEUE_DRIVER_LOW) == (uint32_t)p_avail.pa &&
             rd(R_QUEUE_DEVICE_LOW) == (uint32_t)p_used.pa && rd(R_QUEUE_READY) == 1 &&
             rd(R_STATUS) == S_UP;
    ok = works(why, sizeof why);
    report("frozen-after-driver-ok", frozen && ok,
           "queue num=%u desc=%#x ready=%u status=%#x unchanged=%d, then %s", rd(R_QUEUE_NUM),
           rd(R_QUEUE_DESC_LOW), rd(R_QUEUE_READY), rd(R_STATUS), frozen, why);
}

/* Queues that do not exist: QueueNumMax reads 0, their registers ignore writes, and
 * queue 0 is not affected. */
static void case_queue_select(void)
{
    static const uint32_t sels[] = {1, 99, 0xffffffff};
    char why[200];
    unsigned i;
    uint32_t bad = 0, first = 0;
    int q0, ok;
    begin(0, 1);
    for (i = 0; i < sizeof sels / sizeof sels[0]; i++) {
        uint32_t v;
        wr(R_QUEUE_SEL, sels[i]);
        wr(R_QUEUE_NUM, 8);
        wr(R_QUEUE_DESC_LOW, (uint32_t)p_desc.pa);
        wr(R_QUEUE_READY, 1);
        v = rd(R_QUEUE_NUM_MAX) | rd(R_QUEUE_NUM) | rd(R_QUEUE_READY) | rd(R_QUEUE_DESC_LOW);
        if (v && !bad++)
            first = sels[i];
    }
    wr(R_QUEUE_SEL, 0);
    q0 = rd(R_QUEUE_NUM) == qmax && rd(R_QUEUE_READY) == 0 && rd(R_QUEUE_DESC_LOW) == 0;
    setup_queue(QSIZE, p_desc.pa, p_avail.pa, p_used.pa);
    wr(R_STATUS, S_UP);
    ok = rd(R_STATUS) == S_UP && works(why, sizeof why);
    report("queue-select-out-of-range", !bad && q0 && ok,
           "queues 1,99,0xffffffff: %u not reading 0 (first %#x), queue 0 untouched=%d, then %s",
           bad, first, q0, why);
}

/* FEATURES_OK refused; DRIVER_OK without it ignored; queues cannot be configured. */
static void case_features(const char *name, uint32_t lo, uint32_t hi, uint32_t bad_sel)
{
    char why[200];
    uint32_t st, st2, num;
    int rec;
    if (bad_sel) {
        /* Selectors past the second word: reads 0, writes go nowhere. */
        wr(R_STATUS, 0);
        wr(R_STATUS, S_ACK);
        wr(R_STATUS, S_ACK | S_DRIVER);
        wr(R_DEVICE_FEATURES_SEL, bad_sel);
        num = rd(R_DEVICE_FEATURES);
        wr(R_DRIVER_FEATURES_SEL, bad_sel);
        wr(R_DRIVER_FEATURES, 0xffffffff);
        wr(R_DRIVER_FEATURES_SEL, 1);
        wr(R_DRIVER_FEATURES, 1);
        wr(R_DRIVER_FEATURES_SEL, 0);
        wr(R_DRIVER_FEATURES, 0);
        wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        st = rd(R_STATUS);
        rec = recovers(why, sizeof why);
        report(name, num == 0 && st == (S_ACK | S_DRIVER | S_FEATURES_OK) && rec,
               "device features word %u reads %#x, status after FEATURES_OK %#x, recovered=%d%s%s",
               bad_sel, num, st, rec, rec ? "" : ": ", rec ? "" : why);
        return;
    }
    st = begin(lo, hi);
    wr(R_QUEUE_SEL, 0);
    wr(R_QUEUE_NUM, 8);
    num = rd(R_QUEUE_NUM);
    wr(R_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
    st2 = rd(R_STATUS);
    rec = recovers(why, sizeof why);
    report(name, st == (S_ACK | S_DRIVER) && st2 == (S_ACK | S_DRIVER) && num == qmax && rec,
           "features %#x:%08x: status after FEATURES_OK %#x, after DRIVER_OK %#x, queue num %u "
           "(max %u) recovered=%d%s%s",
           hi, lo, st, st2, num, qmax, rec, rec ? "" : ": ", rec ? "" : why);
}

static void case_config_storm(void)
{
    char why[200];
    uint8_t before[256], after[256];
    long t0;
    int i, ok, same;
    up();
    for (i = 0; i < 256; i += 4) {
        uint32_t v = rd(R_CONFIG + (uint32_t)i);
        memcpy(before + i, &v, 4);
    }
    t0 = now_ms();
    for (i = 0; i < STORM; i++) {
        uint32_t off = R_CONFIG + (uint32_t)((i * 4) % 0xf00);
        if (i % 3 == 0)
            *(volatile uint8_t *)(win + off + 1) = (uint8_t)i;
        else
            wr(off, 0x9e3779b9u * (uint32_t)i);
    }
    t0 = now_ms() - t0;
    for (i = 0; i < 256; i += 4) {
        uint32_t v = rd(R_CONFIG + (uint32_t)i);
        memcpy(after + i, &v, 4);
    }
    same = memcmp(before, after, sizeof before) == 0;
    ok = rd(R_STATUS) == S_UP && works(why, sizeof why);
    report("config-write-storm", same && ok,
           "%d writes to config space in %ld ms, config unchanged=%d, status=%#x, then %s",
           STORM, t0, same, rd(R_STATUS), why);
}

static void case_register_widths(void)
{
    char why[200];
    uint8_t b;
    uint16_t h;
    uint64_t q;
    uint32_t st;
    int ok;
    up();
    b = *(volatile uint8_t *)(win + R_MAGIC);
    h = *(volatile uint16_t *)(win + R_MAGIC);
    q = *(volatile uint64_t *)(win + R_MAGIC);
    *(volatile uint8_t *)(win + R_STATUS) = 0;               /* not a reset */
    *(volatile uint16_t *)(win + R_QUEUE_NOTIFY) = 0;        /* not a kick */
    *(volatile uint64_t *)(win + R_STATUS) = 0;
    st = rd(R_STATUS);
    ok = b == 0 && h == 0 && q == 0 && st == S_UP && rd(R_MAGIC) == MAGIC &&
         works(why, sizeof why);
    report("register-widths", ok,
           "8/16/64-bit reads of MagicValue: %#x %#x %#llx, status after narrow/wide writes "
           "of 0: %#x, then %s",
           b, h, (unsigned long long)q, st, why);
}

static void case_unassigned_mmio(uint64_t pa)
{
    char name[64];
    volatile uint8_t *m = map_phys(pa);
    uint32_t v1, v2;
    uint8_t b;
    uint64_t q;
    snprintf(name, sizeof name, "unassigned-mmio-%#llx", (unsigned long long)pa);
    if (!m) {
        report(name, 0, "cannot map it through /dev/mem: %s", strerror(errno));
        return;
    }
    v1 = *(volatile uint32_t *)(m + 0x70);
    *(volatile uint32_t *)(m + 0x70) = 0;
    *(volatile uint32_t *)(m + 0x50) = 0;
    v2 = *(volatile uint32_t *)(m + 0x70);
    b = m[0];
    q = *(volatile uint64_t *)(m + 8);
    munmap((void *)m, PAGE);
    report(name, v1 == 0xffffffff && v2 == 0xffffffff && b == 0xff && q == ~0ull,
           "reads %#x, after writes %#x, byte %#x, quad %#llx", v1, v2, b,
           (unsigned long long)q);
}

static void case_unassigned_ports(void)
{
    unsigned p, bad = 0, first_bad = 0;
    uint16_t w;
    uint32_t l;
    if (ioperm(0x100, 0x100, 1) != 0) {
        report("unassigned-ports-0x100-0x1ff", 0, "ioperm: %s", strerror(errno));
        return;
    }
    for (p = 0x100; p < 0x200; p++) {
        uint8_t v1 = inb((unsigned short)p), v2;
        outb(0x5a, (unsigned short)p);
        v2 = inb((unsigned short)p);
        if (v1 != 0xff || v2 != 0xff) {
            if (!bad)
                first_bad = p;
            bad++;
        }
    }
    outw(0x1234, 0x180);
    w = inw(0x180);
    outl(0x12345678, 0x184);
    l = inl(0x184);
    ioperm(0x100, 0x100, 0);
    report("unassigned-ports-0x100-0x1ff", bad == 0 && w == 0xffff && l == 0xffffffff,
           "%u of 256 ports not reading 0xff (first %#x), inw %#x, inl %#x", bad, first_bad, w,
           l);
}

/* ---------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    unsigned long long base;
    char *end;
    uint32_t offered_lo, bit;
    if (argc != 2 || (base = strtoull(argv[1], &end, 0), *end) || base % PAGE) {
        fprintf(stderr, "usage: hostile ADDR   (a virtio-mmio window, e.g. 0xd0001000)\n");
        return 2;
    }
    win_pa = base;
    take_over(base);
    win = map_phys(base);
    if (!win)
        die("cannot map %#llx through /dev/mem: %s", base, strerror(errno));
    if (rd(R_MAGIC) != MAGIC || rd(R_VERSION) != 2)
        die("no virtio-mmio version 2 device at %#llx (magic %#x version %u)", base,
            rd(R_MAGIC), rd(R_VERSION));
    devid = rd(R_DEVICE_ID);
    if (devid != DEV_BLK && devid != DEV_RNG)
        die("device type %u at %#llx: only blk (2) and rng (4) are supported", devid, base);
    if (devid == DEV_BLK && !have_sector0)
        die("a block device, but its sector 0 could not be read through Linux first");
    wr(R_STATUS, 0);
    wr(R_QUEUE_SEL, 0);
    qmax = rd(R_QUEUE_NUM_MAX);
    if (qmax < QSIZE)
        die("QueueNumMax %u < %u", qmax, QSIZE);
    wr(R_DEVICE_FEATURES_SEL, 0);
    offered_lo = rd(R_DEVICE_FEATURES);
    ram_end = find_ram_end();
    make_pool();
    p_desc = take_page();
    p_avail = take_page();
    p_used = take_page();
    p_buf = take_page();
    p_buf2 = take_page();
    p_hdr = take_page();
    printf("HOSTILE-INFO device=%s at %#llx queue_num_max=%u features_lo=%#x ram_end=%#llx "
           "contiguous_run=%s rings at %#llx/%#llx/%#llx\n",
           devid == DEV_BLK ? "blk" : "rng", base, qmax, offered_lo,
           (unsigned long long)ram_end, have_run ? "yes" : "no",
           (unsigned long long)p_desc.pa, (unsigned long long)p_avail.pa,
           (unsigned long long)p_used.pa);
    fflush(stdout);

    case_baseline();

    /* Notifications. */
    case_notify_before_driver_ok();
    case_notify_missing_queue();
    case_notify_storm();

    /* Corrupt rings: DEVICE_NEEDS_RESET. */
    case_ring("desc-loop", build_loop, 0, 1);
    case_ring("chain-longer-than-queue", build_whole_table, 0, 1);
    case_ring("head-index-out-of-range", build_single, QSIZE, 1);
    case_ring("next-index-out-of-range", build_next_out_of_range, 0, 1);
    case_ring("indirect-descriptor", build_indirect, 0, 1);
    case_ring("readable-after-writable", build_readable_after_writable, 0, 1);
    case_ring("avail-index-far-ahead", build_single, 0, 1000);
    case_ring("avail-index-one-past-size", build_single, 0, QSIZE + 1);

    /* Bad queue configuration: DEVICE_NEEDS_RESET at DRIVER_OK. */
    case_config("queue-size-0", 0, p_desc.pa, p_avail.pa, p_used.pa);
    case_config("queue-size-not-power-of-2", 12, p_desc.pa, p_avail.pa, p_used.pa);
    case_config("queue-size-above-max", qmax * 2, p_desc.pa, p_avail.pa, p_used.pa);
    case_config("queue-size-65536", 0x10000, p_desc.pa, p_avail.pa, p_used.pa);
    case_config("ring-outside-ram", QSIZE, OUTSIDE_RAM, p_avail.pa, p_used.pa);
    case_config("ring-at-mmio-window", QSIZE, p_desc.pa, p_avail.pa, MMIO_WINDOW0);
    case_config("ring-misaligned", QSIZE, p_desc.pa + 8, p_avail.pa, p_used.pa);
    case_config("ring-crosses-end-of-ram", QSIZE, p_desc.pa, p_avail.pa,
                ram_end ? ram_end - 64 : OUTSIDE_RAM);
    case_frozen();
    case_queue_select();

    /* Feature negotiation. */
    case_features("features-without-version-1", 0, 0, 0);
    for (bit = 31; bit > 0 && (offered_lo >> bit & 1); bit--)
        ;
    case_features("features-not-offered", 1u << bit, 1, 0);
    case_features("features-word-not-offered", 0, 1 | 0x80000000u, 0);
    case_features("features-select-out-of-range", 0, 0, 7);

    /* Requests with bad buffers: only that request fails. */
    if (devid == DEV_RNG) {
        /* A short (or empty) fill, never more than 64 KiB. */
        static const struct bad_req rs[] = {
            {.name = "buffer-outside-ram", .a_addr = OUTSIDE_RAM, .a_len = 64,
             .want_status = -1},
            {.name = "buffer-at-mmio-window", .a_addr = MMIO_WINDOW0, .a_len = 64,
             .want_status = -1},
            {.name = "buffer-at-own-window", .a_addr = OWN, .a_len = 0x100, .want_status = -1},
            {.name = "buffer-crossing-out-of-ram", .a_addr = BUF, .a_len = 64,
             .b_addr = OUTSIDE_RAM, .b_len = 64, .want_len = 64, .want_status = -1,
             .a_touched = 1},
            {.name = "buffer-len-0xffffffff", .a_addr = RUN, .a_len = 0xffffffff,
             .want_len = 65536, .want_status = -1, .a_touched = 1},
            {.name = "buffer-len-0", .a_addr = BUF, .a_len = 0, .want_status = -1},
        };
        unsigned i;
        for (i = 0; i < sizeof rs / sizeof rs[0]; i++)
            case_request(&rs[i]);
    } else {
        /* IOERR (UNSUPP for an unknown type) before any I/O, nothing read or
         * written; no status at all if the status byte is unreachable. */
#define IOERR .want_len = 1, .want_status = 1
        static const struct bad_req bs[] = {
            {.name = "read-into-outside-ram", .type = BLK_IN, .a_addr = OUTSIDE_RAM,
             .a_len = 512, IOERR},
            {.name = "read-into-mmio-window", .type = BLK_IN, .a_addr = MMIO_WINDOW0,
             .a_len = 512, IOERR},
            {.name = "read-into-own-window", .type = BLK_IN, .a_addr = OWN, .a_len = 512, IOERR},
            {.name = "read-partly-outside-ram", .type = BLK_IN, .a_addr = BUF, .a_len = 512,
             .b_addr = OUTSIDE_RAM, .b_len = 512, IOERR},
            {.name = "read-len-0xffffffff", .type = BLK_IN, .a_addr = BUF,
             .a_len = 0xffffffff, IOERR},
            {.name = "read-partial-sector", .type = BLK_IN, .a_addr = BUF, .a_len = 100, IOERR},
            {.name = "read-past-end-of-disk", .type = BLK_IN, .sector = ~0ull >> 9,
             .a_addr = BUF, .a_len = 512, IOERR},
            {.name = "read-status-outside-ram", .type = BLK_IN, .a_addr = BUF, .a_len = 512,
             .status = ST_OUTSIDE, .want_len = 0, .want_status = -1},
            {.name = "read-status-len-0", .type = BLK_IN, .a_addr = BUF, .a_len = 512,
             .status = ST_EMPTY, .want_len = 0, .want_status = -1},
            {.name = "header-too-short", .type = BLK_IN, .hdr_len = 8, .a_addr = BUF,
             .a_len = 512, IOERR},
            {.name = "unknown-request-type", .type = 0xdead, .a_addr = BUF, .a_len = 512,
             .want_len = 1, .want_status = 2},
            {.name = "write-from-outside-ram", .type = BLK_OUT, .a_addr = OUTSIDE_RAM,
             .a_len = 512, IOERR},
            {.name = "write-from-mmio-window", .type = BLK_OUT, .a_addr = MMIO_WINDOW0,
             .a_len = 4096, IOERR},
            {.name = "write-partly-outside-ram", .type = BLK_OUT, .a_addr = BUF, .a_len = 512,
             .b_addr = OUTSIDE_RAM, .b_len = 512, IOERR},
            {.name = "write-len-0xffffffff", .type = BLK_OUT, .a_addr = BUF,
             .a_len = 0xffffffff, IOERR},
            {.name = "write-partial-sector", .type = BLK_OUT, .a_addr = BUF, .a_len = 100,
             IOERR},
            {.name = "write-past-end-of-disk", .type = BLK_OUT, .sector = ~0ull, .a_addr = BUF,
             .a_len = 512, IOERR},
        };
#undef IOERR
        unsigned i;
        for (i = 0; i < sizeof bs / sizeof bs[0]; i++)
            case_request(&bs[i]);
    }

    /* Register accesses. */
    case_config_storm();
    case_register_widths();

    /* Leave the device reset. */
    wr(R_STATUS, 0);

    /* Nothing there. */
    case_unassigned_mmio(0xd00ff000);
    case_unassigned_mmio(0xe0000000);
    case_unassigned_mmio(0x100000000ull);
    case_unassigned_ports();

    printf("HOSTILE-SUMMARY device=%s cases=%d failed=%d\n",
           devid == DEV_BLK ? "blk" : "rng", cases, failures);
    fflush(stdout);
    return failures ? 1 : 0;
}

/* SPDX-License-Identifier: Apache-2.0
 *
 * A C AF_XDP receiver and a C frame sender, for measuring the data path without
 * Python in it (benchmarks/receive.py --c drives both).
 *
 *   xsk_bench rx MAP_FD IFINDEX QUEUE COUNT
 *       Make an AF_XDP socket (copy mode, 4096 x 2 KiB UMEM, 2048-slot rings),
 *       bind it to IFINDEX/QUEUE, put it in the XSKMAP that MAP_FD (inherited)
 *       refers to at key QUEUE, print "ready", then busy-poll the RX ring until
 *       COUNT frames or 1 s without one after the first.  Prints
 *       "RECEIVED FIRST_NS LAST_NS" (CLOCK_MONOTONIC).
 *
 *   xsk_bench tx IFNAME COUNT
 *       Send COUNT 64-byte UDP frames on IFNAME through AF_PACKET (qdisc
 *       bypassed, 64 frames per sendmmsg).
 *
 * Only the kernel's UAPI headers: no libbpf, no libxdp.  Exits 1 naming the
 * step that failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_XDP
#define SOL_XDP 283
#endif
#ifndef AF_XDP
#define AF_XDP 44
#endif

#define FRAMES 4096u
#define FRAME_SIZE 2048u
#define RING 2048u
#define BATCH 64

static void die(const char *what)
{
	fprintf(stderr, "xsk_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct ring {
	uint32_t *producer, *consumer;
	void *desc;
};

static void map_ring(int fd, const struct xdp_ring_offset *off, size_t elem, uint64_t pgoff,
		     struct ring *r)
{
	size_t len = off->desc + RING * elem;
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
		       (off_t)pgoff);

	if (p == MAP_FAILED)
		die("mmap ring");
	r->producer = (uint32_t *)(p + off->producer);
	r->consumer = (uint32_t *)(p + off->consumer);
	r->desc = p + off->desc;
}

static int rx(int map_fd, int ifindex, uint32_t queue, uint64_t want)
{
	struct xdp_umem_reg reg = { 0 };
	struct xdp_mmap_offsets off;
	socklen_t optlen = sizeof(off);
	struct sockaddr_xdp sxdp = { 0 };
	struct ring fill, rxr;
	uint32_t ring = RING, i;
	uint64_t got = 0, first = 0, last = 0;
	union bpf_attr attr;
	void *umem;
	int fd;

	fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_XDP)");
	umem = mmap(NULL, (size_t)FRAMES * FRAME_SIZE, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (umem == MAP_FAILED)
		die("mmap UMEM");
	reg.addr = (uint64_t)(uintptr_t)umem;
	reg.len = (uint64_t)FRAMES * FRAME_SIZE;
	reg.chunk_size = FRAME_SIZE;
	if (setsockopt(fd, SOL_XDP, XDP_UMEM_REG, &reg, sizeof(reg)))
		die("XDP_UMEM_REG");
	if (setsockopt(fd, SOL_XDP, XDP_UMEM_FILL_RING, &ring, sizeof(ring)) ||
	    setsockopt(fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &ring, sizeof(ring)) ||
	    setsockopt(fd, SOL_XDP, XDP_RX_RING, &ring, sizeof(ring)))
		die("ring sizes");
	if (getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &optlen))
		die("XDP_MMAP_OFFSETS");
	map_ring(fd, &off.fr, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING, &fill);
	map_ring(fd, &off.rx, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING, &rxr);
	for (i = 0; i < RING; i++)
		((uint64_t *)fill.desc)[i] = (uint64_t)i * FRAME_SIZE;
	__atomic_store_n(fill.producer, RING, __ATOMIC_RELEASE);

	sxdp.sxdp_family = AF_XDP;
	sxdp.sxdp_ifindex = (uint32_t)ifindex;
	sxdp.sxdp_queue_id = queue;
	sxdp.sxdp_flags = XDP_COPY;
	if (bind(fd, (struct sockaddr *)&sxdp, sizeof(sxdp)))
		die("bind");
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (uint32_t)map_fd;
	attr.key = (uint64_t)(uintptr_t)&queue;
	attr.value = (uint64_t)(uintptr_t)&fd;
	if (syscall(SYS_bpf, BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr)))
		die("BPF_MAP_UPDATE_ELEM (the XSKMAP)");
	printf("ready\n");
	fflush(stdout);

	while (got < want) {
		uint32_t prod = __atomic_load_n(rxr.producer, __ATOMIC_ACQUIRE);
		uint32_t cons = *rxr.consumer;
		uint32_t fprod = *fill.producer;
		uint32_t n = prod - cons;

		if (!n) {
			if (got && now_ns() - last > 1000000000ull)
				break;
			continue;
		}
		last = now_ns();
		if (!got)
			first = last;
		for (i = 0; i < n; i++) {
			struct xdp_desc *d = &((struct xdp_desc *)rxr.desc)[(cons + i) & (RING - 1)];

			((uint64_t *)fill.desc)[(fprod + i) & (RING - 1)] = d->addr & ~(uint64_t)(FRAME_SIZE - 1);
		}
		__atomic_store_n(rxr.consumer, cons + n, __ATOMIC_RELEASE);
		__atomic_store_n(fill.producer, fprod + n, __ATOMIC_RELEASE);
		got += n;
	}
	printf("%llu %llu %llu\n", (unsigned long long)got, (unsigned long long)first,
	       (unsigned long long)last);
	return 0;
}

static int tx(const char *ifname, uint64_t count)
{
	static unsigned char frame[64];
	struct sockaddr_ll sll = { 0 };
	struct mmsghdr msgs[BATCH];
	struct iovec iov = { .iov_base = frame, .iov_len = sizeof(frame) };
	int one = 1, fd, i;
	uint64_t sent = 0;

	fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_PACKET)");
	sll.sll_family = AF_PACKET;
	sll.sll_ifindex = (int)if_nametoindex(ifname);
	sll.sll_protocol = htons(ETH_P_IP);
	if (!sll.sll_ifindex)
		die("if_nametoindex");
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)))
		die("bind(AF_PACKET)");
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
	/* Broadcast Ethernet, IPv4 10.0.0.1 -> 10.0.0.2, UDP 9 -> 9. */
	memset(frame, 0xff, 6);
	memcpy(frame + 6, "\x02\x00\x00\x00\x00\x01\x08\x00", 8);
	memcpy(frame + 14, "\x45\x00\x00\x32\x00\x00\x40\x00\x40\x11\x00\x00"
			   "\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x09\x00\x09\x00\x1e\x00\x00", 28);
	memset(msgs, 0, sizeof(msgs));
	for (i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	while (sent < count) {
		int n = (int)(count - sent < BATCH ? count - sent : BATCH);
		int r = sendmmsg(fd, msgs, (unsigned int)n, 0);

		if (r < 0) {
			if (errno == ENOBUFS || errno == EAGAIN)
				continue;
			die("sendmmsg");
		}
		sent += (uint64_t)r;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "rx"))
		return rx(atoi(argv[2]), atoi(argv[3]), (uint32_t)atoi(argv[4]),
			  strtoull(argv[5], NULL, 10));
	if (argc == 4 && !strcmp(argv[1], "tx"))
		return tx(argv[2], strtoull(argv[3], NULL, 10));
	fprintf(stderr, "usage: xsk_bench rx MAP_FD IFINDEX QUEUE COUNT | tx IFNAME COUNT\n");
	return 2;
}

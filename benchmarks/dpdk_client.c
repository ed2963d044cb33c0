/* SPDX-License-Identifier: Apache-2.0
 *
 * A load client that performs the fd-handout handshake the way DPDK's af_xdp
 * PMD does in use_cni mode (one SOCK_SEQPACKET connection, then /connect,
 * /version, /xsk_map_fd, /fin, each a write followed by one read), written
 * for the benchmark: it repeats the handshake and prints one latency per line
 * (nanoseconds), so the Python driver can aggregate.
 *
 *   dpdk_client SOCKET NETDEV COUNT [DEADLINE_UNIX_NS]
 *
 * Stops after COUNT handshakes, or at DEADLINE when COUNT is 0.  Exits 1 on the
 * first failed step, naming it.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Send one request, read one reply; returns the fd attached to it or -1. */
static int step(int sock, const char *req, const char *want, int *fd_out)
{
	char reply[128];
	char control[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { .iov_base = reply, .iov_len = sizeof(reply) - 1 };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = control, .msg_controllen = sizeof(control),
	};
	struct cmsghdr *cmsg;
	ssize_t n;

	if (write(sock, req, strlen(req)) < 0)
		return -1;
	n = recvmsg(sock, &msg, 0);
	if (n <= 0)
		return -1;
	reply[n] = '\0';
	for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg))
		if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS)
			memcpy(fd_out, CMSG_DATA(cmsg), sizeof(int));
	return strcmp(reply, want) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	char host[64], connect_req[64], map_req[64];
	long count, done = 0;
	uint64_t deadline = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: %s SOCKET NETDEV COUNT [DEADLINE_UNIX_NS]\n", argv[0]);
		return 2;
	}
	strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
	count = atol(argv[3]);
	if (argc > 4)
		deadline = strtoull(argv[4], NULL, 10);
	gethostname(host, sizeof(host) - 1);
	host[sizeof(host) - 1] = '\0';
	snprintf(connect_req, sizeof(connect_req), "/connect,%s", host);
	snprintf(map_req, sizeof(map_req), "/xsk_map_fd,%s", argv[2]);

	while (count ? done < count : now_ns(CLOCK_REALTIME) < deadline) {
		uint64_t t0 = now_ns(CLOCK_MONOTONIC);
		int map_fd = -1, ignored = -1;
		int sock = socket(AF_UNIX, SOCK_SEQPACKET, 0);

		if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
			perror("connect");
			return 1;
		}
		if (step(sock, connect_req, "/host_ok", &ignored) ||
		    step(sock, "/version", "0.1", &ignored) ||
		    step(sock, map_req, "/fd_ack", &map_fd) || map_fd < 0 ||
		    step(sock, "/fin", "/fin_ack", &ignored)) {
			fprintf(stderr, "handshake %ld failed\n", done);
			return 1;
		}
		close(map_fd);
		close(sock);
		printf("%llu\n", (unsigned long long)(now_ns(CLOCK_MONOTONIC) - t0));
		done++;
	}
	return 0;
}

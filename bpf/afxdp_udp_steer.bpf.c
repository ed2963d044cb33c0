// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * An example custom program: steer chosen UDP flows to AF_XDP, the rest to the kernel.
 *
 * A frame goes to the AF_XDP socket in xsks_map[rx_queue_index] when it is
 * IPv4 or IPv6 (no VLAN tag, no IPv6 extension header, not an IPv4 fragment
 * after the first) carrying UDP with a destination port present in
 * udp_ports; every other frame, and any frame whose slot is empty, gets
 * XDP_PASS.  So a pod can take, say, its VXLAN or GTP-U traffic with AF_XDP
 * while ARP, ICMP and everything else still reach the kernel on the same
 * netdev.
 *
 * The contract with the loader (bpf/program.py) is the default program's:
 * an XSKMAP named "xsks_map", sized and handed out by the daemon.  The ports
 * are the keys of udp_ports (host byte order; the value is ignored), written
 * by whoever configures the program after it is loaded.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1); /* the loader sizes it to the queue count */
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} udp_ports SEC(".maps");

static __always_inline struct udphdr *udp_header(void *data, void *end)
{
	struct ethhdr *eth = data;
	__u8 proto;
	void *l4;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return 0;
		if (ip->frag_off & bpf_htons(0x1fff)) /* not the first fragment: no UDP header */
			return 0;
		proto = ip->protocol;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return 0;
		proto = ip6->nexthdr;
		l4 = ip6 + 1;
	} else {
		return 0;
	}
	if (proto != IPPROTO_UDP || l4 + sizeof(struct udphdr) > end)
		return 0;
	return l4;
}

SEC("xdp")
int afxdp_udp_steer(struct xdp_md *ctx)
{
	struct udphdr *udp = udp_header((void *)(long)ctx->data, (void *)(long)ctx->data_end);
	__u16 port;

	if (!udp)
		return XDP_PASS;
	port = bpf_ntohs(udp->dest);
	if (!bpf_map_lookup_elem(&udp_ports, &port))
		return XDP_PASS;
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";

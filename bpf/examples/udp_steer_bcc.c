// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * bpf/afxdp_udp_steer.bpf.c written for bcc: a pool can name this file as
 * `program: {source: /path/udp_steer_bcc.c, name: udp_steer}` and the daemon
 * compiles it on the node (see docs/kubernetes.md, "Custom XDP programs").
 *
 * UDP frames (IPv4/IPv6, no VLAN tag or IPv6 extension header) whose
 * destination port is a key of udp_ports go to the AF_XDP socket in
 * xsks_map[rx_queue_index]; everything else gets XDP_PASS.
 *
 * The contract with the daemon: an XSKMAP named xsks_map, sized with
 * AFXDP_XSKMAP_SIZE, which the daemon defines as the netdev's queue count.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

BPF_XSKMAP(xsks_map, AFXDP_XSKMAP_SIZE);
BPF_HASH(udp_ports, u16, u8, 64);

static __always_inline struct udphdr *udp_header(void *data, void *end)
{
	struct ethhdr *eth = data;
	u8 proto;
	void *l4;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return 0;
		if (ip->frag_off & htons(0x1fff))
			return 0;
		proto = ip->protocol;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == htons(ETH_P_IPV6)) {
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

int udp_steer(struct xdp_md *ctx)
{
	struct udphdr *udp = udp_header((void *)(long)ctx->data, (void *)(long)ctx->data_end);
	u16 port;

	if (!udp)
		return XDP_PASS;
	port = ntohs(udp->dest);
	if (!udp_ports.lookup(&port))
		return XDP_PASS;
	return xsks_map.redirect_map(ctx->rx_queue_index, XDP_PASS);
}

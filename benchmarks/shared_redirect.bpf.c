// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * An experiment for benchmarks/shared_program.py, not the product's program:
 * ONE redirect program for every netdev, which finds the netdev's own XSKMAP
 * by ifindex in a map of maps.  Attaching one program to many netdevs changes
 * the kernel's XDP dispatcher only once; the product's one program per netdev
 * changes it (and waits for an RCU grace period) on each of the first 48.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define XSKMAP_SLOTS 64 /* every inner map must have this size (xsk_map_meta_equal) */

struct xskmap {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XSKMAP_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__array(values, struct xskmap);
} xsks_by_ifindex SEC(".maps");

SEC("xdp")
int afxdp_shared(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	void *xsks = bpf_map_lookup_elem(&xsks_by_ifindex, &ifindex);

	if (!xsks)
		return XDP_PASS;
	return bpf_redirect_map(xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";

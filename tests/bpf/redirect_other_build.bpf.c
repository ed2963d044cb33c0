// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Another build of the default redirect program, for upgrade tests: the same
 * name, the same XSKMAP, the same behaviour, one extra harmless instruction
 * (a stack store), so the kernel gives it a different tag.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

SEC("xdp")
int afxdp_redirect(struct xdp_md *ctx)
{
	volatile __u32 build = 2;

	(void)build;
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";

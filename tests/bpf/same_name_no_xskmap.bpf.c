// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* A program named like ours that is not ours: no XSKMAP named xsks_map. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int afxdp_redirect(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";

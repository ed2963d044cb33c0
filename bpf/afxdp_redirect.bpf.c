// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The default afxdp-k8s redirect program.
 *
 * Every frame received on queue N is redirected to the AF_XDP socket stored in
 * xsks_map[N]; when that slot is empty (or N is beyond the map) the frame goes
 * to the kernel stack as if no program were attached.
 *
 * The loader (bpf/program.py) relies on two names defined here:
 *   - the program  "afxdp_redirect" (how an attached copy is recognised), and
 *   - the XSKMAP   "xsks_map" (resized to the netdev's queue count at load).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	/* Placeholder: the loader sets max_entries before load. */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

SEC("xdp")
int afxdp_redirect(struct xdp_md *ctx)
{
	/*
	 * The low bits of the flags argument are the action returned when the
	 * lookup fails (kernel >= 5.3), so an empty slot means XDP_PASS without
	 * a separate bpf_map_lookup_elem().
	 */
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";

// SPDX-License-Identifier: GPL-2.0
/*
 * tc clsact egress classifier: look the destination up in an LPM trie and
 * steer matching packets into their HTB class through skb->priority.
 *
 * Compiled by bcc (shaper/loader.py).  Attached in direct-action mode, it
 * always returns TC_ACT_OK: it never drops, it only chooses a class.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "shaper.h"

BPF_LPM_TRIE(dst_lpm, struct shaper_lpm_key, struct shaper_lpm_val, SHAPER_MAX_PREFIXES);
BPF_PERCPU_ARRAY(rule_stats, struct shaper_rule_stats, SHAPER_MAX_RULES + 1);
/* Not used here: declared so bcc creates it beside the others (see shaper.h). */
BPF_F_TABLE("hash", __u32, struct shaper_rule_meta, rule_meta, SHAPER_MAX_RULES + 1, BPF_F_NO_PREALLOC);

struct vlan_hdr_s {
	__be16 tci;
	__be16 encap_proto;
};

int classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct shaper_lpm_key key = {};
	struct shaper_lpm_val *val;
	__u64 now;
	__u16 proto;
	__u32 off = sizeof(*eth);

	if (data + sizeof(*eth) > data_end)
		return TC_ACT_OK;
	proto = eth->h_proto;

	/* A tag offloaded to skb->vlan_tci is not in the data; one tag that is
	 * in the data is skipped.  Deeper stacks pass unclassified. */
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr_s *vh = data + off;

		if ((void *)(vh + 1) > data_end)
			return TC_ACT_OK;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = data + off;

		if ((void *)(ip4 + 1) > data_end)
			return TC_ACT_OK;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ip4->daddr, 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
	} else {
		return TC_ACT_OK;
	}
	key.prefixlen = 128;

	now = bpf_ktime_get_ns();
	/* An expired entry must behave as if it were absent, so a shorter live
	 * prefix (e.g. a catch-all) still applies: retry with the expired
	 * entry's prefix length minus one. */
#pragma unroll
	for (int i = 0; i < SHAPER_MAX_FALLBACK; i++) {
		val = dst_lpm.lookup(&key);
		if (!val)
			return TC_ACT_OK;
		if (val->expires_ns == 0 || now < val->expires_ns) {
			__u32 slot = val->slot;
			struct shaper_rule_stats *st = rule_stats.lookup(&slot);

			if (st) {
				/* Per-CPU slot: no atomics needed.  GSO packets
				 * count once per segment, as HTB counts them. */
				st->packets += skb->gso_segs > 1 ? skb->gso_segs : 1;
				st->bytes += skb->len;
			}
			skb->priority = val->classid;
			return TC_ACT_OK;
		}
		if (val->prefixlen == 0)
			return TC_ACT_OK;
		key.prefixlen = val->prefixlen - 1;
	}
	return TC_ACT_OK;
}

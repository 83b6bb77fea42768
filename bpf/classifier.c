// SPDX-License-Identifier: GPL-2.0
/*
 * tc clsact classifiers: look the packet's peer up in an LPM trie and steer
 * matching packets into their HTB class through skb->priority.
 *
 *   classify          clsact egress:  peer = destination, dst_lpm, the
 *                     interface's own HTB.  Always TC_ACT_OK.
 *   classify_ingress  clsact ingress: peer = source, src_lpm; attached
 *                     without direct action, with a mirred action that
 *                     redirects to the ifb (whose HTB holds the ingress
 *                     classes) the packets it reports a match for; it
 *                     returns "no match" for the rest, which are never
 *                     redirected.
 *
 * Compiled by bcc (shaper/datapath/loader.py).  Neither program drops
 * anything: they only choose a class.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "shaper.h"

BPF_LPM_TRIE(dst_lpm, struct shaper_lpm_key, struct shaper_lpm_val, SHAPER_MAX_PREFIXES);
BPF_LPM_TRIE(src_lpm, struct shaper_lpm_key, struct shaper_lpm_val, SHAPER_MAX_PREFIXES);
/* dst_lpm's prefixlen-128 entries again, by whole address (see shaper.h).
 * Entries are allocated as they are written; the buckets (16 bytes per
 * entry it may hold: 4 MiB at the default size) are allocated with the map. */
BPF_F_TABLE("hash", struct shaper_host_key, struct shaper_lpm_val, dst_host, SHAPER_MAX_PREFIXES, BPF_F_NO_PREALLOC);
BPF_LPM_TRIE(port_lpm, struct shaper_port_key, struct shaper_port_val, SHAPER_MAX_PORT_ENTRIES);
BPF_PERCPU_ARRAY(rule_stats, struct shaper_rule_stats, SHAPER_MAX_RULES + 1);
BPF_PERCPU_ARRAY(rule_stats_in, struct shaper_rule_stats, SHAPER_MAX_RULES + 1);
/* The ifb's ifindex, written by the controller; the mirred action holds the redirect itself. */
BPF_ARRAY(ingress_cfg, struct shaper_ingress_cfg, 1);
/* Not used here: declared so bcc creates it beside the others (see shaper.h). */
BPF_F_TABLE("hash", __u32, struct shaper_rule_meta, rule_meta, SHAPER_MAX_RULES + 1, BPF_F_NO_PREALLOC);

#define IP_OFFSET_MASK 0x1FFF
/* classify_ingress's verdicts (cls_bpf without direct action): -1 is a match
 * with the filter's own classid, which runs its actions; 0 (TC_ACT_OK, what
 * every other path returns) is no match. */
#define SHAPER_INGRESS_MATCH -1	/* iphdr.frag_off: the fragment offset bits */
#define PORT_KEY_BITS (32 + 8 + 16)

struct vlan_hdr_s {
	__be16 tci;
	__be16 encap_proto;
};

/* The transport fields a port rule compares, read once per packet that has a
 * trie entry (a packet without one is done before them). */
struct l4_info {
	__u8 proto;
	__u8 port[2];	/* the peer's port, as on the wire (big-endian) */
};

/* An entry applies while its deadline is ahead.  The clock is read at most
 * once per packet, and only for an entry that has a deadline. */
static __always_inline int live(__u64 expires_ns, __u64 *now)
{
	if (expires_ns == 0)
		return 1;
	if (*now == 0)
		*now = bpf_ktime_get_ns();
	return *now < expires_ns;
}

/* The protocol and the peer's port (the destination port on egress, the
 * source port on ingress).  No IPv6 extension-header walk: nexthdr is the
 * protocol.  Protocols without ports, and IPv4 fragments after the first
 * (they carry no transport header), have port 0.  The ports are read in
 * place when they are in the linear data; bpf_skb_load_bytes reads them when
 * they are not.  SHAPER_MAX_L4_OFF (Ethernet, one VLAN tag, the longest IPv4
 * header) bounds the variable transport offset for the verifier. */
#define SHAPER_MAX_L4_OFF (14 + 4 + 60)

static __always_inline void parse_l4(struct __sk_buff *skb, struct l4_info *l4, __u32 l4_off, __u8 proto,
				     int no_ports, const int ingress)
{
	l4->proto = proto;
	if (no_ports)
		return;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return;
	/* TCP, UDP and SCTP all start with the source port, then the destination port.
	 * Read in place when the ports are in the linear data (the usual case: the
	 * helper call alone was most of the port lookup's cost), else copied. */
	if (l4_off <= SHAPER_MAX_L4_OFF) {
		__u8 *ports = (__u8 *)(long)skb->data + l4_off;

		if ((void *)(ports + 4) <= (void *)(long)skb->data_end) {
			l4->port[0] = ports[ingress ? 0 : 2];
			l4->port[1] = ports[ingress ? 1 : 3];
			return;
		}
	}
	if (bpf_skb_load_bytes(skb, l4_off + (ingress ? 0 : 2), l4->port, 2) < 0) {
		l4->port[0] = 0;
		l4->port[1] = 0;
	}
}

/* The packet matched `slot`: count it, give HTB its class, and on ingress
 * send it through the ifb. */
static __always_inline int decide(struct __sk_buff *skb, __u32 slot, __u32 classid, const int ingress)
{
	struct shaper_rule_stats *st;

	if (ingress)
		st = rule_stats_in.lookup(&slot);
	else
		st = rule_stats.lookup(&slot);
	if (st) {
		/* Per-CPU slot: no atomics needed.  GSO packets count once per
		 * segment, as HTB counts them. */
		st->packets += skb->gso_segs > 1 ? skb->gso_segs : 1;
		st->bytes += skb->len;
	}
	skb->priority = classid;
	/* Ingress: a match, for the filter's mirred action (the program is attached
	 * without direct action there), which redirects the packet to the ifb's
	 * egress: its HTB reads skb->priority, then the ifb hands the packet back to
	 * this interface's receive path.  Not bpf_redirect(): on Debian 12's 6.1 it
	 * leaves skb->redirected unset, and the ifb drops every packet that did not
	 * come through mirred (all of them, in the VM tier). */
	return ingress ? SHAPER_INGRESS_MATCH : TC_ACT_OK;
}

static __always_inline int shaper_classify(struct __sk_buff *skb, const int ingress)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct shaper_lpm_key key = {};
	struct shaper_port_key pkey = {};
	struct shaper_lpm_val *val;
	struct shaper_port_val *pv;
	struct l4_info l4 = {};
	__u64 now = 0;
	__u32 off = sizeof(*eth);
	__u32 l4_off;
	__u16 proto;
	__u8 l4_proto;
	int no_ports = 0;

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
		if (ingress)
			__builtin_memcpy(&key.addr[12], &ip4->saddr, 4);
		else
			__builtin_memcpy(&key.addr[12], &ip4->daddr, 4);
		/* Kept for a port group: cheap register copies, no extra access. */
		l4_proto = ip4->protocol;
		l4_off = off + ip4->ihl * 4;
		no_ports = (ip4->frag_off & bpf_htons(IP_OFFSET_MASK)) != 0;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		if (ingress)
			__builtin_memcpy(key.addr, &ip6->saddr, 16);
		else
			__builtin_memcpy(key.addr, &ip6->daddr, 16);
		l4_proto = ip6->nexthdr;
		l4_off = off + sizeof(*ip6);
	} else {
		return TC_ACT_OK;
	}
	key.prefixlen = 128;

	/* An entry that decides nothing (expired, or only port rules none of
	 * which applies) must behave as if it were absent, so a shorter prefix
	 * (e.g. a catch-all) still applies: retry at its prefix length minus one.
	 * An entry of prefix length 0 (an `except`, or ::/0) stops the walk. */
#pragma unroll
	for (int i = 0; i < SHAPER_MAX_FALLBACK; i++) {
		val = NULL;
		/* Egress looks in the host hash first: a host's entry without the
		 * trie's walk.  Missed, the trie answers as it would alone (it holds
		 * every entry).  Ingress has no hash (its lookups, by the sources of
		 * what arrives, are not where the rates were lost). */
		if (i == 0 && !ingress)
			val = dst_host.lookup((struct shaper_host_key *)key.addr);
		if (!val) {
			if (ingress)
				val = src_lpm.lookup(&key);
			else
				val = dst_lpm.lookup(&key);
		}
		if (!val)
			return TC_ACT_OK;
		/* Parsed with the first entry found, whether or not a port rule needs
		 * it: a few loads.  Parsed lazily (where a port rule first asked), each
		 * unrolled step had a parsed and an unparsed variant and the verifier
		 * walked ~87,000 instructions in ~200 ms per program; this way ~3,700
		 * in ~8 ms, which is most of loading the classifier from the cache. */
		if (i == 0)
			parse_l4(skb, &l4, l4_off, l4_proto, no_ports, ingress);
		if (val->flags & SHAPER_F_PORT) {
			/* The key's one port rule, held in the value: compare, no lookup. */
			__u8 plen = val->port_plen;
			__u16 mask = plen >= 16 ? 0xFFFF : plen ? (__u16)(0xFFFF << (16 - plen)) : 0;
			__u16 port, first;

			port = (__u16)l4.port[0] << 8 | l4.port[1];
			first = (__u16)val->port_hi << 8 | val->port_lo;
			if (l4.proto == val->port_proto && (port & mask) == first && live(val->port_expires_ns, &now))
				return decide(skb, val->port_slot, SHAPER_HTB_MAJOR << 16 | val->port_slot, ingress);
		} else if (val->group) {
			pkey.prefixlen = PORT_KEY_BITS;
			pkey.group = val->group;
			pkey.proto = l4.proto;
			pkey.port_hi = l4.port[0];
			pkey.port_lo = l4.port[1];
			pv = port_lpm.lookup(&pkey);
			if (pv && !live(pv->expires_ns, &now)) {
				/* An expired port rule is absent: the group's protocol-only
				 * rule (ports never overlap within a group, so it is the only
				 * other candidate) may still apply. */
				pkey.prefixlen = 40;
				pv = port_lpm.lookup(&pkey);
				if (pv && !live(pv->expires_ns, &now))
					pv = NULL;
			}
			if (pv)
				return decide(skb, pv->slot, pv->classid, ingress);
		}
		if (val->slot && live(val->expires_ns, &now))
			return decide(skb, val->slot, val->classid, ingress);
		if (val->prefixlen == 0)
			return TC_ACT_OK;
		key.prefixlen = val->prefixlen - 1;
	}
	return TC_ACT_OK;
}

int classify(struct __sk_buff *skb)
{
	/* A packet that went through the ingress ifb keeps the ingress class it
	 * was given there; forwarded or bridged out of this host, it would land in
	 * the egress class of the same number (another rule's).  Egress starts
	 * from no class of shaper's, so only what matches here is shaped here. */
	if (skb->priority >> 16 == SHAPER_HTB_MAJOR)
		skb->priority = 0;
	return shaper_classify(skb, 0);
}

int classify_ingress(struct __sk_buff *skb)
{
	return shaper_classify(skb, 1);
}

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Layouts shared by the tc classifier (classifier.c) and the Python controller.
 *
 * The Python side does not restate these: shaper/datapath/abi.py parses the structs
 * and #defines below and builds its codec from them, and tests/unit checks the
 * result against gcc's sizeof/offsetof.  Keep to that parser's grammar: one
 * field per line, types __u8/__u16/__u32/__u64, optional [N] arrays, and lay
 * fields out so no implicit padding is needed (every struct is checked).
 */
#ifndef SHAPER_H
#define SHAPER_H

/* Rule slots.  Slot N owns HTB class SHAPER_HTB_MAJOR:N, its leaf qdisc N:0
 * and rule_stats[N].  Slot 0 is reserved (class minor 0 is invalid, and
 * rule_meta[0] holds the controller's own record).  Leaf majors stay below
 * SHAPER_HTB_MAJOR and below the kernel's automatic handles (0x8000+). */
#define SHAPER_MAX_RULES 16383
#define SHAPER_HTB_MAJOR 0x5348
/* The tries' size: set with -DSHAPER_MAX_PREFIXES=N by the loader when
 * $SHAPER_MAX_PREFIXES says so (entries are allocated as they are written). */
#ifndef SHAPER_MAX_PREFIXES
#define SHAPER_MAX_PREFIXES 262144
#endif
/* How many expired entries one lookup may step over to reach a shorter,
 * live prefix (bounded so the verifier accepts the loop). */
#define SHAPER_MAX_FALLBACK 8
#define SHAPER_META_LEN 1020
/* port_lpm's capacity: (group, protocol, port block) entries of both directions. */
#define SHAPER_MAX_PORT_ENTRIES 65536
/* shaper_lpm_val.flags: an entry written for an `except`.  The classifier
 * ignores it (it acts on slot and prefixlen alone); the controller reads it. */
#define SHAPER_F_DERIVED 1
/* shaper_lpm_val.flags: the port_* fields hold this key's one port rule. */
#define SHAPER_F_PORT 2

/* LPM trie key.  IPv4 is stored IPv4-mapped (::ffff:a.b.c.d, prefixlen 96+n)
 * so one trie and one lookup serve both families. */
struct shaper_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* dst_host key: a whole address, IPv4-mapped as in the tries.  dst_lpm's
 * prefixlen-128 entries (IPv6 /128s, IPv4 /32s) are written to this hash as
 * well, with the same value: the egress classifier finds a host with one hash
 * probe (~35 ns) where the trie walks ~30 nodes (~200 ns at 100,000 hosts, more
 * when they are not in the cache).  The trie stays the whole state: the
 * controller reads it alone, and a classifier from before the hash (pins
 * adopted across an upgrade) does not read the hash. */
struct shaper_host_key {
	__u8 addr[16];
};

/* LPM trie value, of dst_lpm (egress, keyed by destination) and src_lpm
 * (ingress, keyed by source).  classid goes to skb->priority as is
 * (major<<16 | minor), which HTB matches before running any filter; slot
 * indexes rule_stats (0: no address-only rule here, classid is 0 too).
 * expires_ns is CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 means never.
 * prefixlen is where the lookup falls back from, past an entry that decides
 * nothing (retry at prefixlen - 1); 0 stops there, unclassified, which is how
 * an `except` carves a prefix out of a shorter one.  group names the port and
 * protocol rules at this key in port_lpm (0: none).  When those are a single
 * rule with one protocol and one port block (tcp port 5432, udp), the most
 * common case, they are held here instead (flags & SHAPER_F_PORT): port_slot's
 * rule matches protocol port_proto and the ports whose top port_plen bits
 * equal port_hi:port_lo (plen 0: any), until port_expires_ns, at the cost of a
 * comparison rather than a port_lpm lookup. */
struct shaper_lpm_val {
	__u32 classid;
	__u32 slot;
	__u64 expires_ns;
	__u32 prefixlen;
	__u16 group;
	__u16 flags;
	__u64 port_expires_ns;
	__u32 port_slot;
	__u8 port_proto;
	__u8 port_plen;
	__u8 port_hi;
	__u8 port_lo;
};

/* port_lpm key: (group, protocol, port block).  The trie's prefixlen counts
 * data bits: 32 (group) + 8 (proto) + the port's leading bits, so a rule for
 * ports 8000-8191 is one entry of prefixlen 40 + 3 and a protocol-only rule
 * one of prefixlen 40.  Groups only ever match whole, so their byte order is
 * irrelevant; the port is big-endian (port_hi first) so that its leading bits
 * are the ones the trie compares first. */
struct shaper_port_key {
	__u32 prefixlen;
	__u32 group;
	__u8 proto;
	__u8 port_hi;
	__u8 port_lo;
	__u8 pad;
};

/* port_lpm value: as shaper_lpm_val, without the fallback (a port rule that
 * does not apply leaves the packet to the address-only rule at the same key). */
struct shaper_port_val {
	__u32 classid;
	__u32 slot;
	__u64 expires_ns;
};

/* ingress_cfg[0]: where the ingress program redirects what it matched, the
 * ifb whose HTB holds the ingress classes; 0: no ifb yet, redirect nothing. */
struct shaper_ingress_cfg {
	__u32 ifb_ifindex;
	__u32 pad;
};

/* Per-CPU counters, indexed by slot: rule_stats (egress), rule_stats_in (ingress). */
struct shaper_rule_stats {
	__u64 packets;
	__u64 bytes;
};

/* rule_meta value: the rule as JSON (controller-owned; the classifier never
 * reads it).  Keeping it in a pinned map means the kernel holds the whole
 * state, and removing the pins removes every trace. */
struct shaper_rule_meta {
	__u32 len;
	__u8 json[SHAPER_META_LEN];
};

#endif /* SHAPER_H */

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
#define SHAPER_MAX_PREFIXES 262144
/* How many expired entries one lookup may step over to reach a shorter,
 * live prefix (bounded so the verifier accepts the loop). */
#define SHAPER_MAX_FALLBACK 8
#define SHAPER_META_LEN 1020

/* LPM trie key.  IPv4 is stored IPv4-mapped (::ffff:a.b.c.d, prefixlen 96+n)
 * so one trie and one lookup serve both families. */
struct shaper_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* LPM trie value.  classid goes to skb->priority as is (major<<16 | minor),
 * which HTB matches before running any filter; slot indexes rule_stats.  expires_ns is
 * CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 means never.  prefixlen repeats the
 * key's so an expired entry can fall back to the next shorter prefix. */
struct shaper_lpm_val {
	__u32 classid;
	__u32 slot;
	__u64 expires_ns;
	__u32 prefixlen;
	__u32 pad;	/* zero; keeps the struct free of implicit padding */
};

/* Per-CPU counters, indexed by slot. */
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

// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmarks' UDP packet generator and counter, compiled with gcc at bench time.
 *
 *   sender blast SECONDS PAYLOAD DESTFILE [PPS]
 *       Send PAYLOAD-byte UDP datagrams (port 9) round-robin to the IPv4
 *       addresses in DESTFILE for SECONDS, with sendmmsg() in batches of 64
 *       (PPS 0: as fast as possible; otherwise paced to PPS).  Prints
 *       "sent errors seconds" on one line.
 *   sender recv ADDR SECONDS [SKIP]
 *       Count UDP datagrams arriving at ADDR:9 for SECONDS; prints "count
 *       payload_bytes span": those that arrived after the first SKIP seconds
 *       and the time from the first to the last of them.
 *
 * Python sending one datagram per call would measure the interpreter (a few
 * microseconds a packet), not the classifier; sendmmsg sends a batch per
 * system call so the egress path is what the time is spent in.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_DESTS 65536

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int blast(double seconds, int payload, const char *destfile, double pps)
{
	static struct sockaddr_in dests[MAX_DESTS];
	static char buf[65536];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	unsigned long long sent = 0, errors = 0;
	int ndest = 0, fd, next = 0, sndbuf = 4 << 20;
	char line[64];
	FILE *f = fopen(destfile, "r");

	if (!f) {
		perror(destfile);
		return 2;
	}
	while (ndest < MAX_DESTS && fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!*line)
			continue;
		dests[ndest].sin_family = AF_INET;
		dests[ndest].sin_port = htons(9);
		if (inet_pton(AF_INET, line, &dests[ndest].sin_addr) != 1) {
			fprintf(stderr, "bad address %s\n", line);
			return 2;
		}
		ndest++;
	}
	fclose(f);
	if (!ndest || payload < 0 || payload > (int)sizeof(buf)) {
		fprintf(stderr, "no destinations or bad payload size\n");
		return 2;
	}
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 2;
	}
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = buf;
		iov[i].iov_len = payload;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
	}
	double start = now(), end = start + seconds, t = start;
	/* Paced: one batch per interval, smaller batches for low rates. */
	int batch = pps > 0 && pps < 20 * BATCH ? 1 : BATCH;
	double interval = pps > 0 ? batch / pps : 0;

	while ((t = now()) < end) {
		for (int i = 0; i < batch; i++) {
			msgs[i].msg_hdr.msg_name = &dests[next];
			next = next + 1 == ndest ? 0 : next + 1;
		}
		int n = sendmmsg(fd, msgs, batch, 0);
		if (n < 0) {
			errors += batch;
		} else {
			sent += n;
			errors += batch - n;
		}
		if (interval > 0) {
			double due = start + (sent + errors) / pps;
			double wait = due - now();
			if (wait > 0) {
				struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
				nanosleep(&ts, NULL);
			}
		}
	}
	printf("%llu %llu %.6f\n", sent, errors, now() - start);
	return 0;
}

static int recv_count(const char *addr, double seconds, double skip)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(9) };
	static char bufs[BATCH][2048];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	struct timeval tv = { 0, 100000 };
	unsigned long long count = 0, bytes = 0;
	double first = 0, last = 0;
	int rcvbuf = 32 << 20;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0 || inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", addr);
		return 2;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("bind");
		return 2;
	}
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	/* Ready: the caller waits for this line before sending. */
	printf("ready\n");
	fflush(stdout);
	double start = now(), end = start + seconds;

	while (now() < end) {
		int n = recvmmsg(fd, msgs, BATCH, 0, NULL);
		double t = now();

		if (n < 0 && errno != EAGAIN && errno != EINTR)
			perror("recvmmsg");
		if (n <= 0 || t - start < skip)
			continue;
		if (!count)
			first = t;
		last = t;
		count += n;
		for (int i = 0; i < n; i++)
			bytes += msgs[i].msg_len;
	}
	printf("%llu %llu %.6f\n", count, bytes, last - first);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "blast"))
		return blast(atof(argv[2]), atoi(argv[3]), argv[4], argc > 5 ? atof(argv[5]) : 0);
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "recv"))
		return recv_count(argv[2], atof(argv[3]), argc > 4 ? atof(argv[4]) : 0);
	fprintf(stderr, "usage: sender blast SECONDS PAYLOAD DESTFILE [PPS] | sender recv ADDR SECONDS [SKIP]\n");
	return 2;
}

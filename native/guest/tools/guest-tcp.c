// SPDX-License-Identifier: MIT
/*
 * TCP baselines for bench/guest-rdma.ts, built static so the busybox guest
 * can run it.
 *
 *   guest-tcp send HOST PORT TOTAL
 *     connects and writes TOTAL bytes from one 64 KiB buffer with send()
 *     (nothing read from a file or pipe, as perftest posts from its
 *     buffers), then waits for the receiver to close the connection.
 *   guest-tcp pingpong HOST PORT ITERS SIZE
 *     TCP_NODELAY; ITERS times: send SIZE bytes, read SIZE bytes back (the
 *     peer echoes); prints the round trips' median, p99 and minimum in µs.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int dial(const char *host, const char *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	int fd;

	a.sin_port = htons((unsigned short)atoi(port));
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", host);
		exit(2);
	}
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		perror("connect");
		exit(1);
	}
	return fd;
}

static int send_all(int fd, long long total)
{
	static char buf[65536];
	long long sent = 0;

	memset(buf, 0xa5, sizeof(buf));
	while (sent < total) {
		size_t n = total - sent < (long long)sizeof(buf) ? (size_t)(total - sent) : sizeof(buf);
		ssize_t w = send(fd, buf, n, 0);

		if (w < 0) {
			perror("send");
			return 1;
		}
		sent += w;
	}
	shutdown(fd, SHUT_WR);
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	printf("sent %lld bytes\n", sent);
	return 0;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int pingpong(int fd, int iters, int size)
{
	char buf[4096];
	double *rt;
	int one = 1, i;

	if (iters < 1 || size < 1 || size > (int)sizeof(buf)) {
		fprintf(stderr, "bad ITERS or SIZE\n");
		return 2;
	}
	rt = calloc(iters, sizeof(*rt));
	if (!rt)
		return 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(buf, 0x5a, sizeof(buf));
	for (i = 0; i < iters; i++) {
		struct timespec t0, t1;
		int got = 0;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (send(fd, buf, size, 0) != size) {
			perror("send");
			return 1;
		}
		while (got < size) {
			ssize_t r = read(fd, buf + got, size - got);

			if (r <= 0) {
				perror("read");
				return 1;
			}
			got += r;
		}
		clock_gettime(CLOCK_MONOTONIC, &t1);
		rt[i] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
	}
	qsort(rt, iters, sizeof(*rt), cmp);
	printf("PINGPONG iters=%d size=%d median_us=%.1f p99_us=%.1f min_us=%.1f\n", iters, size, rt[iters / 2],
	       rt[(int)(iters * 0.99)], rt[0]);
	free(rt);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "send") == 0)
		return send_all(dial(argv[2], argv[3]), atoll(argv[4]));
	if (argc == 6 && strcmp(argv[1], "pingpong") == 0)
		return pingpong(dial(argv[2], argv[3]), atoi(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: %s send HOST PORT TOTAL | pingpong HOST PORT ITERS SIZE\n", argv[0]);
	return 2;
}

// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * vrdma_stream: data-checking RC traffic between two processes, for
 * live-migration tests. Nothing may be lost, duplicated, reordered or
 * corrupted while the traffic runs, whatever happens to the machine
 * underneath (a VM paused for seconds, then resumed on another host).
 *
 *   server: vrdma_stream -d DEV -g GIDIDX [-p PORT] [-q NQPS] [-t SECS | -n ITERS]
 *   client: vrdma_stream -d DEV -g GIDIDX [-p PORT] [-q NQPS] [-t SECS | -n ITERS] SERVER
 *
 * The two sides exchange QPN, PSN, GID, LID, rkey and buffer address over a
 * TCP connection (as ibv_rc_pingpong does), connect NQPS RC QP pairs, and
 * then both drive traffic on every QP at once, keeping DEPTH work requests
 * in flight per QP. The n-th WR of a QP (its sequence number) is, in a fixed
 * cycle of MIX_LEN: SEND, RDMA WRITE WITH IMMEDIATE, RDMA READ,
 * FETCH_AND_ADD, SEND, RDMA WRITE WITH IMMEDIATE, RDMA READ, CMP_AND_SWP.
 *
 *  - SEND and WRITE payloads (1..MSG_MAX bytes, the length derived from the
 *    QP and sequence number) are a pseudo-random pattern seeded by (sender,
 *    QP, sequence number); the receiver checks length and every byte. The
 *    immediate of a WRITE carries its sequence number, which the receiver
 *    checks against the next message it expects.
 *  - READs fetch a slice of a region the peer filled with a known pattern.
 *  - FETCH_AND_ADD adds to a per-QP counter at the peer; every returned
 *    original must be exactly the sum of the adds before it (a lost or
 *    repeated atomic shows). CMP_AND_SWP walks a second word through a
 *    chain of values; every returned original must be the previous one.
 *  - Every send completion must be the next sequence number of its QP, and
 *    every receive completion the next receive posted: a duplicate, missing
 *    or reordered completion, or one with an error status, ends the run.
 *
 * Completions are interrupt driven (a completion channel and
 * ibv_req_notify_cq). A line "stream: t=N ..." goes out every second. After
 * -t seconds (default 10) or -n WRs per QP, a side stops posting, waits for
 * its last completions and sends its counts over TCP; once it has received
 * everything the peer says it sent, it checks the atomic words the peer
 * drove, sends what it received and compares the peer's view with its own.
 * Then "stream: done ... lost=0 dup=0 corrupt=0" and exit 0, or a "stream:
 * FAIL ..." line per problem and exit 1. Gaps in time are not errors: the
 * QPs use timeout 14, retry_cnt 7, rnr_retry 7 (unlimited RNR retries),
 * and only 60 s without any completion while some are due counts as a
 * stall.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>

#define MAX_QPS 64
#define DEPTH 8		      /* send WRs in flight per QP */
#define RQ_DEPTH 16	      /* receives posted per QP */
#define MSG_MAX 4096	      /* largest SEND / WRITE / READ */
/*
 * WRITE targets per QP, the slot being seq % WSLOTS. A slot is written
 * again only 128 sequence numbers later; by then the receiver has checked
 * it: at most RQ_DEPTH messages (half the cycle's WRs) can have landed
 * unchecked, plus the DEPTH WRs in flight, which is 2 * 16 + 8 sequence
 * numbers.
 */
#define WSLOTS 128
#define READ_REGION (64 * 1024)
#define STALL_MS 60000	      /* no completion for this long while some are due */
#define HANDSHAKE_MS 60000
#define MAX_REPORTS 20	      /* detailed failure lines */
#define PROTO "vrdma_stream/1"

enum op { OP_SEND, OP_WRITE, OP_READ, OP_FADD, OP_CSWAP };
#define MIX_LEN 8
static const enum op mix[MIX_LEN] = { OP_SEND, OP_WRITE, OP_READ, OP_FADD, OP_SEND, OP_WRITE, OP_READ, OP_CSWAP };
static const char *const op_name[] = { "SEND", "WRITE_WITH_IMM", "READ", "FETCH_AND_ADD", "CMP_AND_SWP" };

/* What a pattern is for, part of its seed. */
enum { K_SEND = 1, K_WRITE, K_READREGION, K_LEN, K_OFF, K_ADD, K_SWAP };

/* Per-QP layout of the registered buffer; both sides use the same one. */
#define OFF_SEND 0					/* DEPTH slots: sources, READ and atomic sinks */
#define OFF_RECV (OFF_SEND + DEPTH * MSG_MAX)		/* RQ_DEPTH receive buffers */
#define OFF_WTGT (OFF_RECV + RQ_DEPTH * MSG_MAX)	/* WSLOTS WRITE targets */
#define OFF_READ (OFF_WTGT + WSLOTS * MSG_MAX)		/* READ_REGION, filled once */
#define OFF_ATOM (OFF_READ + READ_REGION)		/* FETCH_AND_ADD word, CMP_AND_SWP word */
#define STRIDE (OFF_ATOM + 4096)

struct qp_state {
	int idx;
	struct ibv_qp *qp;
	uint8_t *base;		/* this QP's part of the buffer */
	uint32_t psn, peer_qpn, peer_psn;
	/* requester */
	uint64_t post_next;	/* next sequence number to post */
	uint64_t cmp_next;	/* next send completion expected */
	unsigned int outstanding;
	uint64_t atom_expect[DEPTH];	/* original value each atomic in flight must return */
	uint64_t fadd_sum;	/* the peer's FETCH_AND_ADD word once every posted add is done */
	uint64_t cswap_val;	/* the peer's CMP_AND_SWP word, likewise */
	uint64_t sends, writes, reads, fadds, cswaps, bytes;
	/* responder */
	uint64_t recv_posted;	/* receives posted so far (wr_id index) */
	uint64_t recv_done;	/* receive completions so far */
	uint64_t in_next;	/* sequence number of the next incoming SEND / WRITE */
	uint64_t in_sends, in_writes;
	uint8_t *read_expect;	/* the peer's READ region, as it must read */
	/* the peer's report */
	bool peer_sent_known;
	uint64_t peer_nseq, peer_sends, peer_writes, peer_fadd_sum, peer_cswap_val;
	uint64_t peer_in_sends, peer_in_writes;
};

static struct {
	const char *dev_name, *server;
	int gid_index, port, nqps;
	long secs, iters;
	int side;		/* 1 server, 0 client */
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	struct ibv_comp_channel *ch;
	struct ibv_cq *scq, *rcq;
	struct ibv_mr *mr;
	uint8_t *buf;
	size_t buf_len;
	struct ibv_port_attr port_attr;
	struct ibv_device_attr dev_attr;
	union ibv_gid gid, peer_gid;
	uint16_t peer_lid;
	uint32_t peer_rkey;
	uint64_t peer_addr;
	enum ibv_mtu mtu;
	struct qp_state qps[MAX_QPS];
	int sock;
	char rbuf[65536];
	size_t rlen;
	uint64_t lost, dup, corrupt, reports;
	uint64_t t0, t_end_ms, last_progress;
	bool posting;
} g = { .port = 18520, .nqps = 4, .sock = -1 };

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t errors(void)
{
	return g.lost + g.dup + g.corrupt;
}

static void totals(uint64_t *sends, uint64_t *writes, uint64_t *reads, uint64_t *atomics, uint64_t *recvd, uint64_t *bytes)
{
	*sends = *writes = *reads = *atomics = *recvd = *bytes = 0;
	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];

		*sends += q->sends;
		*writes += q->writes;
		*reads += q->reads;
		*atomics += q->fadds + q->cswaps;
		*recvd += q->in_sends + q->in_writes;
		*bytes += q->bytes;
	}
}

/* A failure the run cannot go on after (the stream's order is lost, or a QP is in error). */
static void __attribute__((noreturn, format(printf, 1, 2))) fatal(const char *fmt, ...)
{
	uint64_t s, w, r, a, rc, b;
	va_list ap;

	printf("stream: FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	totals(&s, &w, &r, &a, &rc, &b);
	printf("stream: failed sends=%" PRIu64 " writes=%" PRIu64 " reads=%" PRIu64 " atomics=%" PRIu64
	       " recvd=%" PRIu64 " lost=%" PRIu64 " dup=%" PRIu64 " corrupt=%" PRIu64 "\n",
	       s, w, r, a, rc, g.lost, g.dup, g.corrupt);
	fflush(stdout);
	exit(1);
}

/* A checked value that is wrong; the run goes on so the summary can count them. */
static void __attribute__((format(printf, 2, 3))) report(uint64_t *counter, const char *fmt, ...)
{
	va_list ap;

	(*counter)++;
	if (++g.reports > MAX_REPORTS) {
		if (g.reports == MAX_REPORTS + 1)
			printf("stream: FAIL (further failures counted, not printed)\n");
		return;
	}
	printf("stream: FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* ------------------------------------------------------------ patterns */

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t seed(int side, int qp, uint64_t seq, int what)
{
	return mix64(((uint64_t)side << 63) ^ ((uint64_t)what << 56) ^ ((uint64_t)qp << 40) ^ seq);
}

static void pattern(uint8_t *p, size_t len, uint64_t s)
{
	s |= 1;
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v;
		size_t n = len - i < 8 ? len - i : 8;

		s ^= s >> 12;
		s ^= s << 25;
		s ^= s >> 27;
		v = s * 0x2545f4914f6cdd1dull;
		memcpy(p + i, &v, n);
	}
}

static uint32_t msg_len(int side, int qp, uint64_t seq)
{
	return 1 + (uint32_t)(seed(side, qp, seq, K_LEN) % MSG_MAX);
}

static bool is_message(uint64_t seq)
{
	return mix[seq % MIX_LEN] == OP_SEND || mix[seq % MIX_LEN] == OP_WRITE;
}

/* The first message sequence number after `seq`. */
static uint64_t next_message(uint64_t seq)
{
	do
		seq++;
	while (!is_message(seq));
	return seq;
}

/* SENDs and WRITEs among sequence numbers 0..n-1. */
static void messages_in(uint64_t n, uint64_t *sends, uint64_t *writes)
{
	*sends = *writes = 0;
	for (int i = 0; i < MIX_LEN; i++) {
		uint64_t k = n / MIX_LEN + ((uint64_t)i < n % MIX_LEN);

		if (mix[i] == OP_SEND)
			*sends += k;
		else if (mix[i] == OP_WRITE)
			*writes += k;
	}
}

/* Compares `len` bytes at `got` with `want`; reports the first difference. */
static bool check_bytes(const uint8_t *got, const uint8_t *want, size_t len, int qp, uint64_t seq, const char *what)
{
	size_t i;

	if (!memcmp(got, want, len))
		return true;
	for (i = 0; i < len && got[i] == want[i]; i++)
		;
	report(&g.corrupt, "qp=%d seq=%" PRIu64 " %s: byte %zu of %zu is 0x%02x, expected 0x%02x", qp, seq, what, i, len, got[i], want[i]);
	return false;
}

/* ------------------------------------------------------------------ TCP */

static void sock_send(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	for (int off = 0; off < n;) {
		ssize_t w = send(g.sock, line + off, n - off, MSG_NOSIGNAL);

		if (w < 0 && (errno == EINTR || errno == EAGAIN)) {
			struct pollfd p = { .fd = g.sock, .events = POLLOUT };

			poll(&p, 1, 1000);
			continue;
		}
		if (w <= 0)
			fatal("TCP send to the peer: %s", w < 0 ? strerror(errno) : "closed");
		off += w;
	}
}

/* Reads what the socket has; false on EOF. */
static bool sock_fill(void)
{
	ssize_t r;

	if (g.rlen >= sizeof(g.rbuf) - 1)
		fatal("TCP: line from the peer too long");
	r = recv(g.sock, g.rbuf + g.rlen, sizeof(g.rbuf) - 1 - g.rlen, MSG_DONTWAIT);
	if (r == 0)
		return false;
	if (r < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return true;
		fatal("TCP receive from the peer: %s", strerror(errno));
	}
	g.rlen += r;
	return true;
}

/* Takes one complete line out of the buffer into `line` (without '\n'). */
static bool sock_line(char *line, size_t size)
{
	char *nl = memchr(g.rbuf, '\n', g.rlen);
	size_t n;

	if (!nl)
		return false;
	n = nl - g.rbuf;
	if (n >= size)
		fatal("TCP: line from the peer too long");
	memcpy(line, g.rbuf, n);
	line[n] = 0;
	memmove(g.rbuf, nl + 1, g.rlen - n - 1);
	g.rlen -= n + 1;
	return true;
}

/* Waits for one line (handshake). */
static void sock_expect(char *line, size_t size)
{
	uint64_t deadline = now_ms() + HANDSHAKE_MS;

	while (!sock_line(line, size)) {
		struct pollfd p = { .fd = g.sock, .events = POLLIN };
		int64_t left = (int64_t)(deadline - now_ms());

		if (left <= 0)
			fatal("handshake: no answer from the peer in %d s", HANDSHAKE_MS / 1000);
		if (poll(&p, 1, (int)left) > 0 && !sock_fill())
			fatal("handshake: the peer closed the connection");
	}
}

static void tcp_connect(void)
{
	char port[16];
	int one = 1;

	snprintf(port, sizeof(port), "%d", g.port);
	if (g.side == 1) {
		struct addrinfo hints = { .ai_flags = AI_PASSIVE, .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res, *a;
		int lfd = -1, e;

		if ((e = getaddrinfo(NULL, port, &hints, &res)))
			fatal("getaddrinfo: %s", gai_strerror(e));
		for (a = res; a; a = a->ai_next) {
			lfd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
			if (lfd < 0)
				continue;
			setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			if (!bind(lfd, a->ai_addr, a->ai_addrlen) && !listen(lfd, 1))
				break;
			close(lfd);
			lfd = -1;
		}
		freeaddrinfo(res);
		if (lfd < 0)
			fatal("cannot listen on TCP port %d: %s", g.port, strerror(errno));
		printf("stream: server listening on TCP port %d\n", g.port);
		fflush(stdout);
		g.sock = accept(lfd, NULL, NULL);
		if (g.sock < 0)
			fatal("accept: %s", strerror(errno));
		close(lfd);
	} else {
		struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res, *a;
		uint64_t deadline = now_ms() + HANDSHAKE_MS;
		int e;

		if ((e = getaddrinfo(g.server, port, &hints, &res)))
			fatal("getaddrinfo %s: %s", g.server, gai_strerror(e));
		/* The server may not listen yet: retry for a while. */
		while (g.sock < 0) {
			for (a = res; a && g.sock < 0; a = a->ai_next) {
				g.sock = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
				if (g.sock >= 0 && connect(g.sock, a->ai_addr, a->ai_addrlen)) {
					close(g.sock);
					g.sock = -1;
				}
			}
			if (g.sock < 0) {
				if (now_ms() > deadline)
					fatal("cannot connect to %s:%d: %s", g.server, g.port, strerror(errno));
				usleep(100000);
			}
		}
		freeaddrinfo(res);
	}
	setsockopt(g.sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* ---------------------------------------------------------------- verbs */

static const int ACCESS = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

static void open_device(void)
{
	struct ibv_device **list;
	int n, i;

	list = ibv_get_device_list(&n);
	if (!list)
		fatal("ibv_get_device_list: %s", strerror(errno));
	for (i = 0; i < n; i++)
		if (!strcmp(ibv_get_device_name(list[i]), g.dev_name))
			break;
	if (i == n)
		fatal("no RDMA device %s", g.dev_name);
	g.ctx = ibv_open_device(list[i]);
	if (!g.ctx)
		fatal("ibv_open_device %s: %s", g.dev_name, strerror(errno));
	ibv_free_device_list(list);
	if (ibv_query_device(g.ctx, &g.dev_attr))
		fatal("ibv_query_device: %s", strerror(errno));
	if (ibv_query_port(g.ctx, 1, &g.port_attr))
		fatal("ibv_query_port: %s", strerror(errno));
	if (g.port_attr.state != IBV_PORT_ACTIVE)
		fatal("port 1 of %s is not active (state %d)", g.dev_name, g.port_attr.state);
	if (ibv_query_gid(g.ctx, 1, g.gid_index, &g.gid))
		fatal("ibv_query_gid %d: %s", g.gid_index, strerror(errno));
	if (g.dev_attr.atomic_cap == IBV_ATOMIC_NONE)
		fatal("%s does not support atomics", g.dev_name);
	if ((int)g.dev_attr.max_qp_wr < RQ_DEPTH || g.dev_attr.max_cqe < g.nqps * RQ_DEPTH + 1)
		fatal("%s: max_qp_wr %d / max_cqe %d too small for %d QPs", g.dev_name, g.dev_attr.max_qp_wr, g.dev_attr.max_cqe, g.nqps);
}

static void create_resources(void)
{
	g.pd = ibv_alloc_pd(g.ctx);
	if (!g.pd)
		fatal("ibv_alloc_pd: %s", strerror(errno));
	g.ch = ibv_create_comp_channel(g.ctx);
	if (!g.ch)
		fatal("ibv_create_comp_channel: %s", strerror(errno));
	fcntl(g.ch->fd, F_SETFL, fcntl(g.ch->fd, F_GETFL) | O_NONBLOCK);
	g.scq = ibv_create_cq(g.ctx, g.nqps * DEPTH + 1, NULL, g.ch, 0);
	g.rcq = ibv_create_cq(g.ctx, g.nqps * RQ_DEPTH + 1, NULL, g.ch, 0);
	if (!g.scq || !g.rcq)
		fatal("ibv_create_cq: %s", strerror(errno));
	g.buf_len = (size_t)g.nqps * STRIDE;
	g.buf = aligned_alloc(4096, g.buf_len);
	if (!g.buf)
		fatal("out of memory (%zu bytes)", g.buf_len);
	memset(g.buf, 0xa5, g.buf_len);
	g.mr = ibv_reg_mr(g.pd, g.buf, g.buf_len, ACCESS);
	if (!g.mr)
		fatal("ibv_reg_mr (%zu bytes): %s", g.buf_len, strerror(errno));
	srand48(getpid() * 1000003L ^ time(NULL));
	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];
		struct ibv_qp_init_attr init = {
			.send_cq = g.scq,
			.recv_cq = g.rcq,
			.qp_type = IBV_QPT_RC,
			.cap = { .max_send_wr = DEPTH, .max_recv_wr = RQ_DEPTH, .max_send_sge = 1, .max_recv_sge = 1 },
		};
		struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1, .qp_access_flags = ACCESS };

		q->idx = i;
		q->base = g.buf + (size_t)i * STRIDE;
		q->psn = lrand48() & 0xffffff;
		q->qp = ibv_create_qp(g.pd, &init);
		if (!q->qp)
			fatal("ibv_create_qp %d: %s", i, strerror(errno));
		if (ibv_modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
			fatal("qp %d: modify to INIT: %s", i, strerror(errno));
		pattern(q->base + OFF_READ, READ_REGION, seed(g.side, i, 0, K_READREGION));
		memset(q->base + OFF_ATOM, 0, 16);
		q->read_expect = malloc(READ_REGION);
		if (!q->read_expect)
			fatal("out of memory");
		pattern(q->read_expect, READ_REGION, seed(!g.side, i, 0, K_READREGION));
	}
}

static void post_recv(struct qp_state *q)
{
	uint8_t *slot = q->base + OFF_RECV + (q->recv_posted % RQ_DEPTH) * MSG_MAX;
	struct ibv_sge sge = { .addr = (uintptr_t)slot, .length = MSG_MAX, .lkey = g.mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = ((uint64_t)q->idx << 40) | q->recv_posted, .sg_list = &sge, .num_sge = 1 }, *bad;

	memset(slot, 0x5a, MSG_MAX);
	if (ibv_post_recv(q->qp, &wr, &bad))
		fatal("qp=%d ibv_post_recv: %s", q->idx, strerror(errno));
	q->recv_posted++;
}

static void connect_qps(void)
{
	int rd_atom = DEPTH;

	if (rd_atom > g.dev_attr.max_qp_rd_atom)
		rd_atom = g.dev_attr.max_qp_rd_atom;
	if (rd_atom > g.dev_attr.max_qp_init_rd_atom)
		rd_atom = g.dev_attr.max_qp_init_rd_atom;
	if (rd_atom < 1)
		fatal("%s allows no outstanding RDMA READ / atomic", g.dev_name);
	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];
		struct ibv_qp_attr a = {
			.qp_state = IBV_QPS_RTR,
			.path_mtu = g.mtu,
			.dest_qp_num = q->peer_qpn,
			.rq_psn = q->peer_psn,
			.max_dest_rd_atomic = rd_atom,
			.min_rnr_timer = 1,
			.ah_attr = {
				.is_global = 1,
				.grh = { .dgid = g.peer_gid, .sgid_index = g.gid_index, .hop_limit = 1 },
				.dlid = g.peer_lid,
				.port_num = 1,
			},
		};

		while (q->recv_posted < RQ_DEPTH)
			post_recv(q);
		if (ibv_modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
						  IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
			fatal("qp %d: modify to RTR: %s", i, strerror(errno));
		memset(&a, 0, sizeof(a));
		a.qp_state = IBV_QPS_RTS;
		a.sq_psn = q->psn;
		a.timeout = 14;
		a.retry_cnt = 7;
		a.rnr_retry = 7;
		a.max_rd_atomic = rd_atom;
		if (ibv_modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
						  IBV_QP_MAX_QP_RD_ATOMIC))
			fatal("qp %d: modify to RTS: %s", i, strerror(errno));
		q->in_next = 0;
		while (!is_message(q->in_next))
			q->in_next++;
	}
}

static void handshake(void)
{
	char line[512], gidhex[33];
	unsigned int side, nqps, lid, rkey, mtu, stride;
	unsigned long long addr;

	for (int i = 0; i < 16; i++)
		sprintf(gidhex + 2 * i, "%02x", g.gid.raw[i]);
	sock_send(PROTO " side=%d nqps=%d stride=%u lid=%u gid=%s rkey=%u addr=%llx mtu=%d\n", g.side, g.nqps,
		  (unsigned int)STRIDE, g.port_attr.lid, gidhex, g.mr->rkey, (unsigned long long)(uintptr_t)g.buf,
		  g.port_attr.active_mtu);
	for (int i = 0; i < g.nqps; i++)
		sock_send("qp %d qpn=%u psn=%u\n", i, g.qps[i].qp->qp_num, g.qps[i].psn);
	sock_expect(line, sizeof(line));
	if (sscanf(line, PROTO " side=%u nqps=%u stride=%u lid=%u gid=%32s rkey=%u addr=%llx mtu=%u", &side, &nqps, &stride, &lid, gidhex, &rkey, &addr, &mtu) != 8)
		fatal("handshake: unexpected line from the peer: %s", line);
	if (side == (unsigned int)g.side)
		fatal("handshake: the peer is a %s too", g.side ? "server" : "client");
	if (nqps != (unsigned int)g.nqps)
		fatal("handshake: the peer runs %u QPs, this side %d (give both the same -q)", nqps, g.nqps);
	if (stride != STRIDE)
		fatal("handshake: the peer's buffer layout differs (stride %u, here %u)", stride, (unsigned int)STRIDE);
	for (int i = 0; i < 16; i++) {
		unsigned int b;

		if (sscanf(gidhex + 2 * i, "%2x", &b) != 1)
			fatal("handshake: bad GID %s", gidhex);
		g.peer_gid.raw[i] = b;
	}
	g.peer_lid = lid;
	g.peer_rkey = rkey;
	g.peer_addr = addr;
	g.mtu = g.port_attr.active_mtu < mtu ? g.port_attr.active_mtu : (enum ibv_mtu)mtu;
	for (int i = 0; i < g.nqps; i++) {
		int idx;
		unsigned int qpn, psn;

		sock_expect(line, sizeof(line));
		if (sscanf(line, "qp %d qpn=%u psn=%u", &idx, &qpn, &psn) != 3 || idx != i)
			fatal("handshake: unexpected line from the peer: %s", line);
		g.qps[i].peer_qpn = qpn;
		g.qps[i].peer_psn = psn;
	}
	connect_qps();
	/* Neither side sends before both have every QP in RTS with receives posted. */
	sock_send("ready\n");
	sock_expect(line, sizeof(line));
	if (strcmp(line, "ready"))
		fatal("handshake: unexpected line from the peer: %s", line);
	inet_ntop(AF_INET6, g.peer_gid.raw, line, sizeof(line));
	printf("stream: %s %s gid[%d] connected to %s: %d RC QPs, mtu %d, depth %d, %s\n", g.side ? "server" : "client",
	       g.dev_name, g.gid_index, line, g.nqps, 128 << g.mtu, DEPTH, g.iters ? "iterations" : "seconds");
	fflush(stdout);
}

/* ---------------------------------------------------------------- traffic */

static void post_one(struct qp_state *q)
{
	uint64_t seq = q->post_next;
	enum op op = mix[seq % MIX_LEN];
	uint8_t *slot = q->base + OFF_SEND + (seq % DEPTH) * MSG_MAX;
	uint64_t peer = g.peer_addr + (uint64_t)q->idx * STRIDE;
	uint32_t len = msg_len(g.side, q->idx, seq);
	struct ibv_sge sge = { .addr = (uintptr_t)slot, .length = len, .lkey = g.mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = ((uint64_t)q->idx << 40) | seq,
		.sg_list = &sge,
		.num_sge = 1,
		.send_flags = IBV_SEND_SIGNALED,
	}, *bad;

	switch (op) {
	case OP_SEND:
		pattern(slot, len, seed(g.side, q->idx, seq, K_SEND));
		wr.opcode = IBV_WR_SEND;
		break;
	case OP_WRITE:
		pattern(slot, len, seed(g.side, q->idx, seq, K_WRITE));
		wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
		wr.imm_data = htonl((uint32_t)seq);
		wr.wr.rdma.remote_addr = peer + OFF_WTGT + (seq % WSLOTS) * MSG_MAX;
		wr.wr.rdma.rkey = g.peer_rkey;
		break;
	case OP_READ:
		memset(slot, 0x3c, len);
		wr.opcode = IBV_WR_RDMA_READ;
		wr.wr.rdma.remote_addr = peer + OFF_READ + seed(g.side, q->idx, seq, K_OFF) % (READ_REGION - len + 1);
		wr.wr.rdma.rkey = g.peer_rkey;
		break;
	case OP_FADD: {
		uint64_t add = seed(g.side, q->idx, seq, K_ADD);

		sge.length = 8;
		q->atom_expect[seq % DEPTH] = q->fadd_sum;
		memcpy(slot, &(uint64_t){ ~q->fadd_sum }, 8);
		q->fadd_sum += add;
		wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
		wr.wr.atomic.remote_addr = peer + OFF_ATOM;
		wr.wr.atomic.compare_add = add;
		wr.wr.atomic.rkey = g.peer_rkey;
		break;
	}
	case OP_CSWAP: {
		uint64_t next = seed(g.side, q->idx, seq, K_SWAP);

		sge.length = 8;
		q->atom_expect[seq % DEPTH] = q->cswap_val;
		memcpy(slot, &(uint64_t){ ~q->cswap_val }, 8);
		wr.opcode = IBV_WR_ATOMIC_CMP_AND_SWP;
		wr.wr.atomic.remote_addr = peer + OFF_ATOM + 8;
		wr.wr.atomic.compare_add = q->cswap_val;
		wr.wr.atomic.swap = next;
		wr.wr.atomic.rkey = g.peer_rkey;
		q->cswap_val = next;
		break;
	}
	}
	if (ibv_post_send(q->qp, &wr, &bad))
		fatal("qp=%d seq=%" PRIu64 " ibv_post_send %s: %s", q->idx, seq, op_name[op], strerror(errno));
	q->post_next++;
	q->outstanding++;
}

static bool may_post(struct qp_state *q)
{
	if (!g.posting)
		return false;
	if (g.iters)
		return q->post_next < (uint64_t)g.iters;
	return true;
}

static void refill(struct qp_state *q)
{
	while (q->outstanding < DEPTH && may_post(q))
		post_one(q);
}

static struct qp_state *qp_of(const struct ibv_wc *wc, const char *cq)
{
	uint64_t idx = wc->wr_id >> 40;

	if (idx >= (uint64_t)g.nqps || g.qps[idx].qp->qp_num != wc->qp_num)
		fatal("%s completion with wr_id 0x%" PRIx64 " for QPN %u matches no posted WR", cq, wc->wr_id, wc->qp_num);
	return &g.qps[idx];
}

static void send_done(const struct ibv_wc *wc)
{
	struct qp_state *q = qp_of(wc, "send");
	uint64_t seq = wc->wr_id & ((1ull << 40) - 1);
	enum op op = mix[seq % MIX_LEN];
	uint8_t *slot = q->base + OFF_SEND + (seq % DEPTH) * MSG_MAX;
	uint32_t len = msg_len(g.side, q->idx, seq);
	static const enum ibv_wc_opcode opc[] = { IBV_WC_SEND, IBV_WC_RDMA_WRITE, IBV_WC_RDMA_READ, IBV_WC_FETCH_ADD, IBV_WC_COMP_SWAP };

	if (wc->status != IBV_WC_SUCCESS) {
		if (seq == q->cmp_next)
			g.lost++;
		fatal("qp=%d seq=%" PRIu64 " %s completed with status %s (%d, vendor_err 0x%x)", q->idx, seq,
		      seq < q->post_next ? op_name[op] : "?", ibv_wc_status_str(wc->status), wc->status, wc->vendor_err);
	}
	if (seq != q->cmp_next) {
		if (seq < q->cmp_next) {
			g.dup++;
			fatal("qp=%d duplicate send completion: seq %" PRIu64 " again (next expected %" PRIu64 ")", q->idx, seq, q->cmp_next);
		}
		g.lost++;
		fatal("qp=%d send completion for seq %" PRIu64 " while seq %" PRIu64 " is due (missing or out of order; %" PRIu64 " posted)",
		      q->idx, seq, q->cmp_next, q->post_next);
	}
	if (seq >= q->post_next) {
		g.dup++;
		fatal("qp=%d send completion for seq %" PRIu64 ", which was never posted", q->idx, seq);
	}
	if (wc->opcode != opc[op])
		report(&g.corrupt, "qp=%d seq=%" PRIu64 " %s completed with opcode %d", q->idx, seq, op_name[op], wc->opcode);
	switch (op) {
	case OP_SEND:
		q->sends++;
		q->bytes += len;
		break;
	case OP_WRITE:
		q->writes++;
		q->bytes += len;
		break;
	case OP_READ: {
		uint64_t off = seed(g.side, q->idx, seq, K_OFF) % (READ_REGION - len + 1);

		if (wc->byte_len != len)
			report(&g.corrupt, "qp=%d seq=%" PRIu64 " READ: byte_len %u, expected %u", q->idx, seq, wc->byte_len, len);
		check_bytes(slot, q->read_expect + off, len, q->idx, seq, "READ");
		q->reads++;
		q->bytes += len;
		break;
	}
	case OP_FADD:
	case OP_CSWAP: {
		uint64_t orig;

		memcpy(&orig, slot, 8);
		if (orig != q->atom_expect[seq % DEPTH])
			report(&g.corrupt, "qp=%d seq=%" PRIu64 " %s returned 0x%016" PRIx64 ", expected 0x%016" PRIx64 " (an atomic lost or repeated?)",
			       q->idx, seq, op_name[op], orig, q->atom_expect[seq % DEPTH]);
		if (op == OP_FADD)
			q->fadds++;
		else
			q->cswaps++;
		break;
	}
	}
	q->cmp_next++;
	q->outstanding--;
}

static void recv_done(const struct ibv_wc *wc)
{
	struct qp_state *q = qp_of(wc, "receive");
	uint64_t idx = wc->wr_id & ((1ull << 40) - 1);
	uint64_t seq = q->in_next;
	enum op want = mix[seq % MIX_LEN];
	int peer = !g.side;
	uint32_t len = msg_len(peer, q->idx, seq);
	uint8_t expect[MSG_MAX];

	if (wc->status != IBV_WC_SUCCESS) {
		g.lost++;
		fatal("qp=%d receive %" PRIu64 " (incoming seq %" PRIu64 ") completed with status %s (%d, vendor_err 0x%x)", q->idx, idx,
		      seq, ibv_wc_status_str(wc->status), wc->status, wc->vendor_err);
	}
	if (idx != q->recv_done) {
		if (idx < q->recv_done)
			g.dup++;
		else
			g.lost++;
		fatal("qp=%d receive completion for receive %" PRIu64 " while %" PRIu64 " is due", q->idx, idx, q->recv_done);
	}
	if (wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
		uint32_t imm = ntohl(wc->imm_data);

		if (!(wc->wc_flags & IBV_WC_WITH_IMM))
			report(&g.corrupt, "qp=%d seq=%" PRIu64 " WRITE_WITH_IMM: completion without IBV_WC_WITH_IMM", q->idx, seq);
		if (want != OP_WRITE || imm != (uint32_t)seq) {
			if (imm < (uint32_t)seq)
				g.dup++;
			else
				g.lost++;
			fatal("qp=%d incoming WRITE_WITH_IMM with immediate %u while %s seq %" PRIu64 " is due (%s)", q->idx, imm,
			      op_name[want], seq, imm < (uint32_t)seq ? "duplicate" : "missing or out of order");
		}
		uint8_t *slot = q->base + OFF_WTGT + (seq % WSLOTS) * MSG_MAX;

		pattern(expect, len, seed(peer, q->idx, seq, K_WRITE));
		check_bytes(slot, expect, len, q->idx, seq, "incoming WRITE");
		memset(slot, 0xa5, len);
		q->in_writes++;
	} else if (wc->opcode == IBV_WC_RECV) {
		uint8_t *slot = q->base + OFF_RECV + (idx % RQ_DEPTH) * MSG_MAX;

		if (want != OP_SEND) {
			g.lost++;
			fatal("qp=%d incoming SEND while WRITE_WITH_IMM seq %" PRIu64 " is due (missing or out of order)", q->idx, seq);
		}
		if (wc->wc_flags & IBV_WC_WITH_IMM)
			report(&g.corrupt, "qp=%d seq=%" PRIu64 " incoming SEND carries an immediate", q->idx, seq);
		if (wc->byte_len != len) {
			report(&g.corrupt, "qp=%d seq=%" PRIu64 " incoming SEND of %u bytes, expected %u", q->idx, seq, wc->byte_len, len);
		} else {
			pattern(expect, len, seed(peer, q->idx, seq, K_SEND));
			check_bytes(slot, expect, len, q->idx, seq, "incoming SEND");
		}
		q->in_sends++;
	} else {
		g.corrupt++;
		fatal("qp=%d receive completion with opcode %d (seq %" PRIu64 " due)", q->idx, wc->opcode, seq);
	}
	q->recv_done++;
	q->in_next = next_message(seq);
	if (q->peer_sent_known && q->in_sends + q->in_writes > q->peer_sends + q->peer_writes) {
		g.dup++;
		fatal("qp=%d more messages arrived (%" PRIu64 ") than the peer sent (%" PRIu64 ")", q->idx, q->in_sends + q->in_writes,
		      q->peer_sends + q->peer_writes);
	}
	post_recv(q);
}

/* One batch of completions (at most 32); returns how many. */
static int drain(struct ibv_cq *cq, bool send)
{
	struct ibv_wc wc[32];
	int n = ibv_poll_cq(cq, 32, wc);

	if (n < 0)
		fatal("ibv_poll_cq: %d", n);
	for (int i = 0; i < n; i++) {
		if (send)
			send_done(&wc[i]);
		else
			recv_done(&wc[i]);
	}
	if (n) {
		g.last_progress = now_ms();
		if (send)
			for (int i = 0; i < n; i++)
				refill(qp_of(&wc[i], "send"));
	}
	return n;
}

/*
 * Whether each CQ is armed, as far as this program knows. An arm is used up
 * by the first completion after it, whether or not its event has come yet,
 * so a CQ counts as unarmed once an event for it arrives or a poll finds
 * anything in it; it is armed again, and polled once more, before the
 * program sleeps. (Re-arming only on events would wait for ever on an
 * event that a CQ which is polled while its interrupt is on the way never
 * raises.)
 */
static bool scq_armed, rcq_armed;

static void cq_events(void)
{
	struct ibv_cq *cq;
	void *cqctx;

	while (!ibv_get_cq_event(g.ch, &cq, &cqctx)) {
		ibv_ack_cq_events(cq, 1);
		if (cq == g.scq)
			scq_armed = false;
		else
			rcq_armed = false;
	}
	if (errno != EAGAIN && errno != EINTR)
		fatal("ibv_get_cq_event: %s", strerror(errno));
}

/* One batch from each CQ in turn, so that a busy direction starves neither the other nor the clock. True when there may be more. */
static bool poll_both(void)
{
	int ns = drain(g.scq, true), nr = drain(g.rcq, false);

	if (ns)
		scq_armed = false;
	if (nr)
		rcq_armed = false;
	return ns == 32 || nr == 32;
}

/* Before sleeping: arms the CQs that need it, then polls once more. True when that found something (do not sleep). */
static bool arm_before_sleep(void)
{
	bool armed_now = false;

	if (!scq_armed) {
		if (ibv_req_notify_cq(g.scq, 0))
			fatal("ibv_req_notify_cq: %s", strerror(errno));
		scq_armed = armed_now = true;
	}
	if (!rcq_armed) {
		if (ibv_req_notify_cq(g.rcq, 0))
			fatal("ibv_req_notify_cq: %s", strerror(errno));
		rcq_armed = armed_now = true;
	}
	if (!armed_now)
		return false;
	poll_both();
	return !scq_armed || !rcq_armed;
}

/* ---------------------------------------------------------------- the end */

static bool sent_all(void)
{
	for (int i = 0; i < g.nqps; i++)
		if (g.qps[i].outstanding)
			return false;
	return true;
}

static bool received_all(void)
{
	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];

		if (!q->peer_sent_known || q->in_sends < q->peer_sends || q->in_writes < q->peer_writes)
			return false;
	}
	return true;
}

static int peer_sent_lines, peer_recv_lines;
static bool peer_sent_end, peer_recv_end;
static uint64_t peer_lost, peer_dup, peer_corrupt;

static void peer_lines(void)
{
	char line[512];

	while (sock_line(line, sizeof(line))) {
		struct qp_state *q;
		unsigned long long a, b, c, d, e;
		int i;

		if (sscanf(line, "sent %d nseq=%llu sends=%llu writes=%llu fadd=%llx cswap=%llx", &i, &a, &b, &c, &d, &e) == 6 &&
		    i == peer_sent_lines && i < g.nqps) {
			uint64_t ws, ww;

			q = &g.qps[i];
			q->peer_nseq = a;
			q->peer_sends = b;
			q->peer_writes = c;
			q->peer_fadd_sum = d;
			q->peer_cswap_val = e;
			messages_in(a, &ws, &ww);
			if (ws != b || ww != c)
				fatal("qp=%d the peer reports %llu WRs as %llu SENDs and %llu WRITEs (should be %" PRIu64 " and %" PRIu64 ")", i, a,
				      b, c, ws, ww);
			q->peer_sent_known = true;
			if (q->in_sends > b || q->in_writes > c) {
				g.dup++;
				fatal("qp=%d received %" PRIu64 " SENDs and %" PRIu64 " WRITEs; the peer sent %llu and %llu", i, q->in_sends,
				      q->in_writes, b, c);
			}
			peer_sent_lines++;
		} else if (!strcmp(line, "sent-end") && peer_sent_lines == g.nqps) {
			peer_sent_end = true;
		} else if (sscanf(line, "recv %d sends=%llu writes=%llu", &i, &a, &b) == 3 && i == peer_recv_lines && i < g.nqps) {
			g.qps[i].peer_in_sends = a;
			g.qps[i].peer_in_writes = b;
			peer_recv_lines++;
		} else if (sscanf(line, "recv-end lost=%llu dup=%llu corrupt=%llu", &a, &b, &c) == 3 && peer_recv_lines == g.nqps) {
			peer_lost = a;
			peer_dup = b;
			peer_corrupt = c;
			peer_recv_end = true;
		} else {
			fatal("unexpected line from the peer: %s", line);
		}
	}
}

/* With every incoming message in: the words the peer's atomics drove must hold what it says they do. */
static void check_atomic_words(void)
{
	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];
		uint64_t fadd, cswap;

		memcpy(&fadd, q->base + OFF_ATOM, 8);
		memcpy(&cswap, q->base + OFF_ATOM + 8, 8);
		if (fadd != q->peer_fadd_sum)
			report(&g.corrupt, "qp=%d FETCH_AND_ADD word is 0x%016" PRIx64 ", the peer's adds sum to 0x%016" PRIx64, i, fadd,
			       q->peer_fadd_sum);
		if (cswap != q->peer_cswap_val)
			report(&g.corrupt, "qp=%d CMP_AND_SWP word is 0x%016" PRIx64 ", the peer's last swap wrote 0x%016" PRIx64, i, cswap,
			       q->peer_cswap_val);
	}
}

static void progress_line(uint64_t t)
{
	uint64_t s, w, r, a, rc, b;

	totals(&s, &w, &r, &a, &rc, &b);
	printf("stream: t=%" PRIu64 " sends=%" PRIu64 " writes=%" PRIu64 " reads=%" PRIu64 " atomics=%" PRIu64 " recvd=%" PRIu64
	       " errors=%" PRIu64 "\n",
	       t, s, w, r, a, rc, errors());
	fflush(stdout);
}

static void run(void)
{
	bool a_sent = false, b_sent = false;
	uint64_t next_tick, t_stop = 0, wait_since = 0;
	bool busy = false;

	g.t0 = g.last_progress = now_ms();
	next_tick = g.t0 + 1000;
	g.t_end_ms = g.iters ? 0 : g.t0 + (uint64_t)g.secs * 1000;
	g.posting = true;
	for (int i = 0; i < g.nqps; i++)
		refill(&g.qps[i]);

	for (;;) {
		uint64_t now = now_ms();
		struct pollfd p[2] = { { .fd = g.ch->fd, .events = POLLIN }, { .fd = g.sock, .events = POLLIN } };
		int64_t timeout;

		if (g.posting && g.t_end_ms && now >= g.t_end_ms)
			g.posting = false;
		if (g.posting && g.iters) {
			bool more = false;

			for (int i = 0; i < g.nqps; i++)
				more |= g.qps[i].post_next < (uint64_t)g.iters;
			g.posting = more;
		}
		if (!g.posting && !a_sent && sent_all()) {
			t_stop = now;
			for (int i = 0; i < g.nqps; i++) {
				struct qp_state *q = &g.qps[i];

				sock_send("sent %d nseq=%" PRIu64 " sends=%" PRIu64 " writes=%" PRIu64 " fadd=%" PRIx64 " cswap=%" PRIx64 "\n", i,
					  q->post_next, q->sends, q->writes, q->fadd_sum, q->cswap_val);
			}
			sock_send("sent-end\n");
			a_sent = true;
		}
		if (peer_sent_end && !wait_since)
			wait_since = now;
		if (a_sent && peer_sent_end && !b_sent) {
			bool all = received_all();

			if (!all && now - g.last_progress > 30000 && now - wait_since > 30000) {
				for (int i = 0; i < g.nqps; i++) {
					struct qp_state *q = &g.qps[i];
					uint64_t miss = q->peer_sends + q->peer_writes - q->in_sends - q->in_writes;

					if (miss)
						report(&g.lost, "qp=%d %" PRIu64 " of the peer's messages never arrived (got %" PRIu64 " SENDs of %" PRIu64
								", %" PRIu64 " WRITEs of %" PRIu64 ")",
						       i, miss, q->in_sends, q->peer_sends, q->in_writes, q->peer_writes);
					g.lost += miss ? miss - 1 : 0;
				}
				all = true;
			}
			if (all) {
				check_atomic_words();
				for (int i = 0; i < g.nqps; i++)
					sock_send("recv %d sends=%" PRIu64 " writes=%" PRIu64 "\n", i, g.qps[i].in_sends, g.qps[i].in_writes);
				sock_send("recv-end lost=%" PRIu64 " dup=%" PRIu64 " corrupt=%" PRIu64 "\n", g.lost, g.dup, g.corrupt);
				b_sent = true;
			}
		}
		if (b_sent && peer_recv_end)
			break;
		if ((!sent_all() || (peer_sent_end && !received_all())) && now - g.last_progress > STALL_MS) {
			g.lost++;
			fatal("stalled: no completion for %d s", STALL_MS / 1000);
		}
		if (now >= next_tick) {
			progress_line((now - g.t0) / 1000);
			while (next_tick <= now)
				next_tick += 1000;
		}
		timeout = (int64_t)(next_tick - now);
		if (g.posting && g.t_end_ms && (int64_t)(g.t_end_ms - now) < timeout)
			timeout = (int64_t)(g.t_end_ms - now);
		if (!busy && timeout > 0)
			busy = arm_before_sleep();
		if (timeout < 0 || busy)
			timeout = 0;
		if (poll(p, 2, (int)timeout) < 0 && errno != EINTR)
			fatal("poll: %s", strerror(errno));
		if (p[0].revents)
			cq_events();
		busy = poll_both();
		if (p[1].revents) {
			if (!sock_fill() && !(b_sent && peer_recv_end)) {
				peer_lines();
				if (!peer_recv_end)
					fatal("the peer closed the connection before its final counts");
			}
			peer_lines();
		}
	}

	/* Both directions, as each side saw them. */
	uint64_t s, w, r, a, rc, b;
	double secs = (t_stop - g.t0) / 1000.0;
	bool ok = true;

	for (int i = 0; i < g.nqps; i++) {
		struct qp_state *q = &g.qps[i];

		if (q->peer_in_sends != q->sends || q->peer_in_writes != q->writes) {
			printf("stream: FAIL qp=%d this side sent %" PRIu64 " SENDs and %" PRIu64 " WRITEs, the peer received %" PRIu64
			       " and %" PRIu64 "\n",
			       i, q->sends, q->writes, q->peer_in_sends, q->peer_in_writes);
			if (q->peer_in_sends + q->peer_in_writes < q->sends + q->writes)
				g.lost += q->sends + q->writes - q->peer_in_sends - q->peer_in_writes;
			else
				g.dup += q->peer_in_sends + q->peer_in_writes - q->sends - q->writes;
		}
	}
	if (peer_lost || peer_dup || peer_corrupt) {
		printf("stream: FAIL the peer found lost=%" PRIu64 " dup=%" PRIu64 " corrupt=%" PRIu64 " in this side's traffic\n", peer_lost,
		       peer_dup, peer_corrupt);
		ok = false;
	}
	totals(&s, &w, &r, &a, &rc, &b);
	if (secs <= 0)
		secs = 0.001;
	printf("stream: rate secs=%.1f ops/s=%.0f MB/s=%.2f (this side's WRs; recvd=%" PRIu64 ")\n", secs, (s + w + r + a) / secs,
	       b / secs / 1e6, rc);
	ok = ok && !errors();
	printf("stream: %s sends=%" PRIu64 " writes=%" PRIu64 " reads=%" PRIu64 " atomics=%" PRIu64 " lost=%" PRIu64 " dup=%" PRIu64
	       " corrupt=%" PRIu64 "\n",
	       ok ? "done" : "failed", s, w, r, a, g.lost, g.dup, g.corrupt);
	fflush(stdout);
	if (!ok)
		exit(1);
}

static void teardown(void)
{
	for (int i = 0; i < g.nqps; i++) {
		ibv_destroy_qp(g.qps[i].qp);
		free(g.qps[i].read_expect);
	}
	ibv_dereg_mr(g.mr);
	free(g.buf);
	ibv_destroy_cq(g.scq);
	ibv_destroy_cq(g.rcq);
	ibv_destroy_comp_channel(g.ch);
	ibv_dealloc_pd(g.pd);
	ibv_close_device(g.ctx);
	close(g.sock);
}

static void __attribute__((noreturn)) usage(void)
{
	fprintf(stderr,
		"usage: vrdma_stream -d DEV -g GIDIDX [-p TCPPORT] [-q NQPS] [-t SECONDS | -n ITERS] [SERVER]\n"
		"  without SERVER: wait for a client on TCPPORT (default 18520)\n"
		"  -q NQPS      RC QPs, both sides the same (default 4, at most %d)\n"
		"  -t SECONDS   post for this long (default 10)\n"
		"  -n ITERS     post this many WRs per QP instead\n",
		MAX_QPS);
	exit(2);
}

int main(int argc, char **argv)
{
	int opt;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "d:g:p:q:t:n:h")) != -1) {
		switch (opt) {
		case 'd': g.dev_name = optarg; break;
		case 'g': g.gid_index = atoi(optarg); break;
		case 'p': g.port = atoi(optarg); break;
		case 'q': g.nqps = atoi(optarg); break;
		case 't': g.secs = atol(optarg); break;
		case 'n': g.iters = atol(optarg); break;
		default: usage();
		}
	}
	if (optind < argc)
		g.server = argv[optind++];
	if (optind < argc || !g.dev_name || g.nqps < 1 || g.nqps > MAX_QPS || g.port <= 0 || g.port > 65535 || g.secs < 0 || g.iters < 0 ||
	    (g.secs && g.iters))
		usage();
	if (!g.secs && !g.iters)
		g.secs = 10;
	g.side = g.server ? 0 : 1;

	open_device();
	create_resources();
	tcp_connect();
	handshake();
	run();
	teardown();
	return 0;
}

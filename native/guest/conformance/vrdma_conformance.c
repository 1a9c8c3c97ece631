// SPDX-License-Identifier: MIT
/*
 * The conformance scenarios of guest-driver-tests/scenarios, inside a
 * guest, through unmodified libibverbs: whatever verbs device is named
 * (the project's virtio_rdma, or rxe as a reference) must behave as the
 * verbs specification says.
 *
 *   vrdma_conformance -d DEVICE [-g GID_INDEX] [-s SCENARIO] [-r] [-v]
 *
 * -r accepts what Linux rxe (6.1) reports where the verbs specification
 * names another: LOC_QP_OP_ERR for a bad lkey, for a SEND larger than the
 * receive buffer and for a receive buffer without LOCAL_WRITE (spec:
 * LOC_PROT_ERR, LOC_LEN_ERR, LOC_PROT_ERR); and a queried hop limit of 64
 * where 1 was set (the kernel's RoCE address resolution puts the route's
 * hop limit in); a UD SEND longer than the port's active MTU that goes out
 * (rxe sends UD messages up to its netdev's MTU; spec: LOC_LEN_ERR); and
 * REM_INV_REQ_ERR for a WRITE to a QP without REMOTE_WRITE (spec: a
 * remote access error).
 *
 * Every scenario opens its own PD, CQs and QPs; data-path scenarios
 * connect two QPs of the same device (the engine loops the traffic back).
 * Output is TAP: "ok N name" or "not ok N name # reason", then a summary
 * line; the exit code is the number of failed scenarios (capped at 100).
 * "info key=value" lines report device attributes for the caller to
 * compare with the back-end's limits.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>

#define POLL_TIMEOUT_MS 5000
#define BUF_SIZE (1 << 20)
#define QKEY 0x11111111u
#define MIN(a, b) ((a) < (b) ? (a) : (b))

static struct ibv_context *ctx;
static struct ibv_device_attr_ex dev_attr;
static struct ibv_port_attr port_attr;
static union ibv_gid gid;
static int gid_index;
static bool verbose;
static bool rxe_tolerances;
static char failure[512];

/* Records why a scenario failed; returns -1 for `return fail(...)`. */
static int fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(failure, sizeof(failure), fmt, ap);
	va_end(ap);
	return -1;
}

#define CHECK(cond, ...)                                                       \
	do {                                                                   \
		if (!(cond))                                                   \
			return fail(__VA_ARGS__);                              \
	} while (0)

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --------------------------------------------------------------- fixture */

/* One side of a connection: QP with its own CQs and a registered buffer. */
struct side {
	struct ibv_cq *scq, *rcq;
	struct ibv_qp *qp;
	struct ibv_mr *mr;
	uint8_t *buf;
	uint32_t psn;
};

struct pair {
	struct ibv_pd *pd;
	struct side a, b;
	enum ibv_qp_type type;
};

static int side_open(struct pair *p, struct side *s, int access, uint32_t psn,
		     struct ibv_comp_channel *rch)
{
	const struct ibv_device_attr *d = &dev_attr.orig_attr;
	/* Within the device's limits: the scenarios need 8 WRs, 3 SGEs and 48 inline bytes at most. */
	struct ibv_qp_init_attr init = {
		.qp_type = p->type,
		.cap = { .max_send_wr = MIN(64, d->max_qp_wr), .max_recv_wr = MIN(64, d->max_qp_wr),
			 .max_send_sge = MIN(4, d->max_sge), .max_recv_sge = MIN(4, d->max_sge), .max_inline_data = 48 },
	};
	int cqe = MIN(128, d->max_cqe);

	s->psn = psn;
	s->buf = aligned_alloc(4096, BUF_SIZE);
	CHECK(s->buf, "out of memory");
	memset(s->buf, 0, BUF_SIZE);
	s->mr = ibv_reg_mr(p->pd, s->buf, BUF_SIZE, access);
	CHECK(s->mr, "ibv_reg_mr: %s", strerror(errno));
	s->scq = ibv_create_cq(ctx, cqe, NULL, NULL, 0);
	s->rcq = ibv_create_cq(ctx, cqe, NULL, rch, 0);
	CHECK(s->scq && s->rcq, "ibv_create_cq: %s", strerror(errno));
	init.send_cq = s->scq;
	init.recv_cq = s->rcq;
	s->qp = ibv_create_qp(p->pd, &init);
	CHECK(s->qp, "ibv_create_qp: %s", strerror(errno));
	return 0;
}

static void side_close(struct side *s)
{
	if (s->qp)
		ibv_destroy_qp(s->qp);
	if (s->scq)
		ibv_destroy_cq(s->scq);
	if (s->rcq)
		ibv_destroy_cq(s->rcq);
	if (s->mr)
		ibv_dereg_mr(s->mr);
	free(s->buf);
	memset(s, 0, sizeof(*s));
}

/* RESET -> INIT -> RTR -> RTS towards `peer`, as ibv_rc_pingpong does. */
static int connect_qp(struct pair *p, struct side *s, struct side *peer,
		      int access, uint8_t rnr_retry)
{
	struct ibv_qp_attr a = {
		.qp_state = IBV_QPS_INIT,
		.pkey_index = 0,
		.port_num = 1,
		.qp_access_flags = access,
		.qkey = QKEY,
	};
	int mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT;

	mask |= p->type == IBV_QPT_UD ? IBV_QP_QKEY : IBV_QP_ACCESS_FLAGS;
	CHECK(!ibv_modify_qp(s->qp, &a, mask), "modify to INIT: %s", strerror(errno));

	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTR;
	mask = IBV_QP_STATE;
	if (p->type != IBV_QPT_UD) {
		a.path_mtu = IBV_MTU_1024;
		a.dest_qp_num = peer->qp->qp_num;
		a.rq_psn = peer->psn;
		a.ah_attr.is_global = 1;
		a.ah_attr.grh.dgid = gid;
		a.ah_attr.grh.sgid_index = gid_index;
		a.ah_attr.grh.hop_limit = 1;
		a.ah_attr.port_num = 1;
		mask |= IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
		if (p->type == IBV_QPT_RC) {
			a.max_dest_rd_atomic = 1;
			a.min_rnr_timer = 1;
			mask |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
		}
	}
	CHECK(!ibv_modify_qp(s->qp, &a, mask), "modify to RTR: %s", strerror(errno));

	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTS;
	a.sq_psn = s->psn;
	mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
	if (p->type == IBV_QPT_RC) {
		a.timeout = 14;
		a.retry_cnt = 7;
		a.rnr_retry = rnr_retry;
		a.max_rd_atomic = 1;
		mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
	}
	CHECK(!ibv_modify_qp(s->qp, &a, mask), "modify to RTS: %s", strerror(errno));
	return 0;
}

static const int ALL_ACCESS = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
			      IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

/* Two connected QPs; b's receive CQ reports to `rch` when it is not NULL. */
static int pair_open_ch(struct pair *p, enum ibv_qp_type type, uint8_t rnr_retry,
			struct ibv_comp_channel *rch)
{
	memset(p, 0, sizeof(*p));
	p->type = type;
	p->pd = ibv_alloc_pd(ctx);
	CHECK(p->pd, "ibv_alloc_pd: %s", strerror(errno));
	if (side_open(p, &p->a, ALL_ACCESS, 0x1234, NULL) || side_open(p, &p->b, ALL_ACCESS, 0x5678, rch))
		return -1;
	if (connect_qp(p, &p->a, &p->b, ALL_ACCESS, rnr_retry) ||
	    connect_qp(p, &p->b, &p->a, ALL_ACCESS, rnr_retry))
		return -1;
	return 0;
}

static int pair_open(struct pair *p, enum ibv_qp_type type, uint8_t rnr_retry)
{
	return pair_open_ch(p, type, rnr_retry, NULL);
}

static void pair_close(struct pair *p)
{
	side_close(&p->a);
	side_close(&p->b);
	if (p->pd)
		ibv_dealloc_pd(p->pd);
	memset(p, 0, sizeof(*p));
}

/* Waits for exactly one completion on `cq`. */
static int poll_one(struct ibv_cq *cq, struct ibv_wc *wc)
{
	uint64_t end = now_ms() + POLL_TIMEOUT_MS;
	int n;

	do {
		n = ibv_poll_cq(cq, 1, wc);
		CHECK(n >= 0, "ibv_poll_cq: %d", n);
		if (n == 1)
			return 0;
		usleep(100);
	} while (now_ms() < end);
	return fail("no completion within %d ms", POLL_TIMEOUT_MS);
}

/* No completion shows up on `cq` for `ms`. */
static int poll_none(struct ibv_cq *cq, int ms)
{
	uint64_t end = now_ms() + ms;
	struct ibv_wc wc;

	do {
		int n = ibv_poll_cq(cq, 1, &wc);

		CHECK(n == 0, "unexpected completion: status %s opcode %d wr_id %" PRIu64,
		      ibv_wc_status_str(wc.status), wc.opcode, wc.wr_id);
		usleep(200);
	} while (now_ms() < end);
	return 0;
}

static int expect_wc(struct ibv_cq *cq, uint64_t wr_id, enum ibv_wc_status status,
		     int opcode, int byte_len, struct ibv_wc *out)
{
	struct ibv_wc wc;

	if (poll_one(cq, &wc))
		return -1;
	CHECK(wc.wr_id == wr_id, "wr_id %" PRIu64 ", expected %" PRIu64, wc.wr_id, wr_id);
	CHECK(wc.status == status, "wr %" PRIu64 ": status %s, expected %s", wr_id,
	      ibv_wc_status_str(wc.status), ibv_wc_status_str(status));
	if (status == IBV_WC_SUCCESS) {
		CHECK(opcode < 0 || (int)wc.opcode == opcode, "wr %" PRIu64 ": opcode %d, expected %d", wr_id, wc.opcode, opcode);
		CHECK(byte_len < 0 || (int)wc.byte_len == byte_len, "wr %" PRIu64 ": byte_len %u, expected %d", wr_id, wc.byte_len, byte_len);
	}
	if (out)
		*out = wc;
	return 0;
}

static int post_recv(struct side *s, uint64_t wr_id, uint32_t off, uint32_t len)
{
	struct ibv_sge sge = { .addr = (uintptr_t)s->buf + off, .length = len, .lkey = s->mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = wr_id, .sg_list = &sge, .num_sge = 1 }, *bad;

	CHECK(!ibv_post_recv(s->qp, &wr, &bad), "ibv_post_recv: %s", strerror(errno));
	return 0;
}

static int post_send(struct side *s, struct ibv_send_wr *wr)
{
	struct ibv_send_wr *bad;
	int ret = ibv_post_send(s->qp, wr, &bad);

	CHECK(!ret, "ibv_post_send: %s", strerror(ret));
	return 0;
}

static void fill(uint8_t *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(seed + i * 131 + (i >> 8));
}

/* An address handle to this device's own GID (the scenarios loop UD traffic back); NULL after fail(). */
static struct ibv_ah *ah_to_self(struct ibv_pd *pd)
{
	struct ibv_ah_attr aa = { .is_global = 1, .port_num = 1,
				  .grh = { .dgid = gid, .sgid_index = gid_index, .hop_limit = 1 } };
	struct ibv_ah *ah = ibv_create_ah(pd, &aa);

	if (!ah)
		fail("ibv_create_ah: %s", strerror(errno));
	return ah;
}

/* ------------------------------------------------------------ scenarios */

static int query_basics(void)
{
	printf("info max_qp=%d max_cq=%d max_mr=%d max_pd=%d max_ah=%d max_cqe=%d max_qp_wr=%d max_sge=%d max_qp_rd_atom=%d max_mr_size=%" PRIu64 "\n",
	       dev_attr.orig_attr.max_qp, dev_attr.orig_attr.max_cq, dev_attr.orig_attr.max_mr,
	       dev_attr.orig_attr.max_pd, dev_attr.orig_attr.max_ah, dev_attr.orig_attr.max_cqe,
	       dev_attr.orig_attr.max_qp_wr, dev_attr.orig_attr.max_sge,
	       dev_attr.orig_attr.max_qp_rd_atom, (uint64_t)dev_attr.orig_attr.max_mr_size);
	printf("info port_state=%d active_mtu=%d link_layer=%d gid_tbl_len=%d\n", port_attr.state,
	       port_attr.active_mtu, port_attr.link_layer, port_attr.gid_tbl_len);
	CHECK(port_attr.state == IBV_PORT_ACTIVE, "port 1 is %s", ibv_port_state_str(port_attr.state));
	CHECK(dev_attr.orig_attr.max_qp > 0 && dev_attr.orig_attr.max_cq > 0 && dev_attr.orig_attr.max_mr > 0,
	      "device reports no QPs, CQs or MRs");
	CHECK(dev_attr.orig_attr.phys_port_cnt == 1, "%d ports", dev_attr.orig_attr.phys_port_cnt);
	return 0;
}

/* SEND (optionally with immediate) of `len` bytes a -> b. */
static int send_recv(enum ibv_qp_type type, uint32_t len, bool imm)
{
	struct pair p;
	uint32_t grh = type == IBV_QPT_UD ? 40 : 0;
	struct ibv_ah *ah = NULL;
	struct ibv_wc wc;
	int ret = -1;

	if (pair_open(&p, type, 7))
		goto out;
	fill(p.a.buf, len, 3);
	if (post_recv(&p.b, 7, 0, grh + len))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = len, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = 1, .sg_list = &sge, .num_sge = 1,
		.opcode = imm ? IBV_WR_SEND_WITH_IMM : IBV_WR_SEND,
		.send_flags = IBV_SEND_SIGNALED, .imm_data = htobe32(0xc0ffee),
	};
	if (type == IBV_QPT_UD) {
		ah = ah_to_self(p.pd);
		if (!ah)
			goto out;
		wr.wr.ud.ah = ah;
		wr.wr.ud.remote_qpn = p.b.qp->qp_num;
		wr.wr.ud.remote_qkey = QKEY;
	}
	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 1, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 7, IBV_WC_SUCCESS, IBV_WC_RECV, grh + len, &wc))
		goto out;
	if (imm && (!(wc.wc_flags & IBV_WC_WITH_IMM) || be32toh(wc.imm_data) != 0xc0ffee)) {
		fail("immediate not delivered (flags 0x%x, imm 0x%x)", wc.wc_flags, be32toh(wc.imm_data));
		goto out;
	}
	if (type == IBV_QPT_UD && (!(wc.wc_flags & IBV_WC_GRH) || wc.src_qp != p.a.qp->qp_num)) {
		fail("UD receive without GRH flag or with src_qp 0x%x", wc.src_qp);
		goto out;
	}
	if (memcmp(p.b.buf + grh, p.a.buf, len)) {
		fail("received bytes differ");
		goto out;
	}
	ret = 0;
out:
	if (ah)
		ibv_destroy_ah(ah);
	pair_close(&p);
	return ret;
}

/*
 * A UD server's reply path: b answers a datagram through an address handle
 * built from the completion and the GRH it received (ibv_create_ah_from_wc),
 * as UD services do; a gets the answer.
 */
static int ud_reply_from_wc(void)
{
	struct pair p;
	struct ibv_ah *ah = NULL, *reply = NULL;
	struct ibv_wc wc;
	const uint32_t len = 64;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_UD, 7))
		goto out;
	fill(p.a.buf, len, 5);
	fill(p.b.buf + 4096, len, 6);
	if (post_recv(&p.b, 7, 0, 40 + len) || post_recv(&p.a, 8, 8192, 40 + len))
		goto out;
	ah = ah_to_self(p.pd);
	if (!ah)
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = len, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 1, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED };
	wr.wr.ud.ah = ah;
	wr.wr.ud.remote_qpn = p.b.qp->qp_num;
	wr.wr.ud.remote_qkey = QKEY;
	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 1, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 7, IBV_WC_SUCCESS, IBV_WC_RECV, 40 + len, &wc))
		goto out;
	reply = ibv_create_ah_from_wc(p.pd, &wc, (struct ibv_grh *)p.b.buf, 1);
	if (!reply) {
		fail("ibv_create_ah_from_wc on the received GRH: %s", strerror(errno));
		goto out;
	}
	struct ibv_sge rsge = { .addr = (uintptr_t)p.b.buf + 4096, .length = len, .lkey = p.b.mr->lkey };
	struct ibv_send_wr rwr = { .wr_id = 2, .sg_list = &rsge, .num_sge = 1, .opcode = IBV_WR_SEND,
				   .send_flags = IBV_SEND_SIGNALED };
	rwr.wr.ud.ah = reply;
	rwr.wr.ud.remote_qpn = wc.src_qp;
	rwr.wr.ud.remote_qkey = QKEY;
	if (post_send(&p.b, &rwr) || expect_wc(p.b.scq, 2, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.a.rcq, 8, IBV_WC_SUCCESS, IBV_WC_RECV, 40 + len, NULL))
		goto out;
	if (memcmp(p.a.buf + 8192 + 40, p.b.buf + 4096, len)) {
		fail("reply bytes differ");
		goto out;
	}
	ret = 0;
out:
	if (reply)
		ibv_destroy_ah(reply);
	if (ah)
		ibv_destroy_ah(ah);
	pair_close(&p);
	return ret;
}

static int rc_send_recv(void) { return send_recv(IBV_QPT_RC, 5000, false); }
static int rc_send_with_imm(void) { return send_recv(IBV_QPT_RC, 100, true); }
static int uc_send_recv(void) { return send_recv(IBV_QPT_UC, 3000, false); }
static int ud_send_recv(void) { return send_recv(IBV_QPT_UD, 512, true); }
static int zero_length_send(void) { return send_recv(IBV_QPT_RC, 0, false); }

/* RDMA WRITE / WRITE_WITH_IMM / READ of `len` bytes between a and b. */
static int rdma(enum ibv_wr_opcode op, uint32_t len)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	uint8_t *src = op == IBV_WR_RDMA_READ ? p.b.buf + 4096 : p.a.buf;
	uint8_t *dst = op == IBV_WR_RDMA_READ ? p.a.buf : p.b.buf + 4096;

	fill(src, len, 9);
	if (op == IBV_WR_RDMA_WRITE_WITH_IMM && post_recv(&p.b, 8, 0, 0))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = len, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = 2, .sg_list = &sge, .num_sge = 1, .opcode = op,
		.send_flags = IBV_SEND_SIGNALED, .imm_data = htobe32(77),
		.wr.rdma = { .remote_addr = (uintptr_t)p.b.buf + 4096, .rkey = p.b.mr->rkey },
	};
	if (post_send(&p.a, &wr) ||
	    expect_wc(p.a.scq, 2, IBV_WC_SUCCESS, op == IBV_WR_RDMA_READ ? IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE, -1, NULL))
		goto out;
	if (op == IBV_WR_RDMA_WRITE_WITH_IMM &&
	    expect_wc(p.b.rcq, 8, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, len, NULL))
		goto out;
	if (memcmp(dst, src, len)) {
		fail("target bytes differ");
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

static int rdma_write(void) { return rdma(IBV_WR_RDMA_WRITE, 70000); }
static int rdma_write_with_imm(void) { return rdma(IBV_WR_RDMA_WRITE_WITH_IMM, 1500); }
static int rdma_read(void) { return rdma(IBV_WR_RDMA_READ, 70000); }

static int atomic(enum ibv_wr_opcode op)
{
	struct pair p;
	int ret = -1;
	uint64_t *remote, *local;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	remote = (uint64_t *)(p.b.buf + 64);
	local = (uint64_t *)p.a.buf;
	*remote = 100;
	struct ibv_sge sge = { .addr = (uintptr_t)local, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = 3, .sg_list = &sge, .num_sge = 1, .opcode = op, .send_flags = IBV_SEND_SIGNALED,
		.wr.atomic = { .remote_addr = (uintptr_t)remote, .rkey = p.b.mr->rkey,
			       .compare_add = op == IBV_WR_ATOMIC_CMP_AND_SWP ? 100 : 5, .swap = 42 },
	};
	if (post_send(&p.a, &wr) ||
	    expect_wc(p.a.scq, 3, IBV_WC_SUCCESS, op == IBV_WR_ATOMIC_CMP_AND_SWP ? IBV_WC_COMP_SWAP : IBV_WC_FETCH_ADD, -1, NULL))
		goto out;
	if (*local != 100 || *remote != (op == IBV_WR_ATOMIC_CMP_AND_SWP ? 42u : 105u)) {
		fail("original %" PRIu64 ", remote now %" PRIu64, *local, *remote);
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

static int atomic_cmp_swap(void) { return atomic(IBV_WR_ATOMIC_CMP_AND_SWP); }
static int atomic_fetch_add(void) { return atomic(IBV_WR_ATOMIC_FETCH_AND_ADD); }

/* Three SGEs gathered into a receive split over two SGEs. */
static int multi_sge(void)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	fill(p.a.buf, 3000, 5);
	struct ibv_sge rs[2] = {
		{ .addr = (uintptr_t)p.b.buf + 8192, .length = 1000, .lkey = p.b.mr->lkey },
		{ .addr = (uintptr_t)p.b.buf + 16384, .length = 2000, .lkey = p.b.mr->lkey },
	};
	struct ibv_recv_wr rwr = { .wr_id = 9, .sg_list = rs, .num_sge = 2 }, *rbad;
	struct ibv_sge ss[3] = {
		{ .addr = (uintptr_t)p.a.buf, .length = 700, .lkey = p.a.mr->lkey },
		{ .addr = (uintptr_t)p.a.buf + 700, .length = 1300, .lkey = p.a.mr->lkey },
		{ .addr = (uintptr_t)p.a.buf + 2000, .length = 1000, .lkey = p.a.mr->lkey },
	};
	struct ibv_send_wr wr = { .wr_id = 4, .sg_list = ss, .num_sge = 3, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (ibv_post_recv(p.b.qp, &rwr, &rbad)) {
		fail("ibv_post_recv: %s", strerror(errno));
		goto out;
	}
	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 4, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 9, IBV_WC_SUCCESS, IBV_WC_RECV, 3000, NULL))
		goto out;
	if (memcmp(p.b.buf + 8192, p.a.buf, 1000) || memcmp(p.b.buf + 16384, p.a.buf + 1000, 2000)) {
		fail("scattered bytes differ");
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

static int inline_send(void)
{
	struct pair p;
	uint8_t data[48];
	int ret = -1;

	fill(data, sizeof(data), 1);
	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 5, 0, 64))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)data, .length = sizeof(data), .lkey = 0 };
	struct ibv_send_wr wr = { .wr_id = 6, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE };

	if (post_send(&p.a, &wr))
		goto out;
	memset(data, 0, sizeof(data)); /* inline data was copied at post time */
	if (expect_wc(p.a.scq, 6, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 5, IBV_WC_SUCCESS, IBV_WC_RECV, 48, NULL))
		goto out;
	fill(data, sizeof(data), 1);
	if (memcmp(p.b.buf, data, sizeof(data))) {
		fail("inline bytes differ");
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* ibv_query_qp gives back what connect_qp set, and the QP's type and capabilities. */
static int query_qp_attributes(void)
{
	struct pair p;
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr init;
	int ret = -1;
	int mask = IBV_QP_STATE | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_SQ_PSN |
		   IBV_QP_AV | IBV_QP_ACCESS_FLAGS | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
		   IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER | IBV_QP_CAP;

	if (pair_open(&p, IBV_QPT_RC, 6))
		goto out;
	memset(&a, 0, sizeof(a));
	memset(&init, 0, sizeof(init));
	if (ibv_query_qp(p.a.qp, &a, mask, &init)) {
		fail("ibv_query_qp: %s", strerror(errno));
		goto out;
	}
	if (a.qp_state != IBV_QPS_RTS || a.path_mtu != IBV_MTU_1024 || a.dest_qp_num != p.b.qp->qp_num ||
	    a.rq_psn != p.b.psn || a.sq_psn != p.a.psn || a.qp_access_flags != ALL_ACCESS) {
		fail("state %d mtu %d dest 0x%x rq_psn 0x%x sq_psn 0x%x access 0x%x", a.qp_state, a.path_mtu,
		     a.dest_qp_num, a.rq_psn, a.sq_psn, a.qp_access_flags);
		goto out;
	}
	if (a.timeout != 14 || a.retry_cnt != 7 || a.rnr_retry != 6 || a.max_rd_atomic != 1 ||
	    a.max_dest_rd_atomic != 1 || a.min_rnr_timer != 1) {
		fail("timeout %d retry %d rnr_retry %d rd_atomic %d/%d min_rnr_timer %d", a.timeout, a.retry_cnt,
		     a.rnr_retry, a.max_rd_atomic, a.max_dest_rd_atomic, a.min_rnr_timer);
		goto out;
	}
	/*
	 * rxe: on a RoCE port the kernel resolves the destination's MAC and
	 * replaces the hop limit with the route's (ib_resolve_eth_dmac: 64).
	 */
	bool hop_ok = a.ah_attr.grh.hop_limit == 1 || (rxe_tolerances && a.ah_attr.grh.hop_limit == 64);

	if (!a.ah_attr.is_global || memcmp(&a.ah_attr.grh.dgid, &gid, sizeof(gid)) ||
	    a.ah_attr.grh.sgid_index != gid_index || !hop_ok || a.ah_attr.port_num != 1) {
		fail("address vector: global %d sgid_index %d hop_limit %d port %d", a.ah_attr.is_global,
		     a.ah_attr.grh.sgid_index, a.ah_attr.grh.hop_limit, a.ah_attr.port_num);
		goto out;
	}
	if (init.qp_type != IBV_QPT_RC || init.sq_sig_all ||
	    (int)a.cap.max_send_wr < MIN(64, dev_attr.orig_attr.max_qp_wr) ||
	    (int)a.cap.max_send_sge < MIN(4, dev_attr.orig_attr.max_sge) || a.cap.max_inline_data < 48) {
		fail("type %d sig_all %d caps wr %u sge %u inline %u", init.qp_type, init.sq_sig_all,
		     a.cap.max_send_wr, a.cap.max_send_sge, a.cap.max_inline_data);
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/*
 * A full send queue refuses the next WR with ENOMEM and names it in bad_wr;
 * the queued WRs still complete. The receiver has no receive buffers at
 * first, so the SENDs wait in RNR retries and the queue stays full.
 */
static int send_queue_full(void)
{
	struct pair p;
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr init;
	struct ibv_send_wr *wrs = NULL, *bad = NULL, extra;
	struct ibv_sge sge;
	uint32_t depth;
	int ret = -1, err;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	if (ibv_query_qp(p.a.qp, &a, IBV_QP_CAP, &init)) {
		fail("ibv_query_qp: %s", strerror(errno));
		goto out;
	}
	depth = a.cap.max_send_wr;
	wrs = calloc(depth, sizeof(*wrs));
	CHECK(wrs, "out of memory");
	sge = (struct ibv_sge){ .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	for (uint32_t i = 0; i < depth; i++) {
		wrs[i] = (struct ibv_send_wr){ .wr_id = 100 + i, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND,
					       .send_flags = i + 1 == depth ? IBV_SEND_SIGNALED : 0,
					       .next = i + 1 < depth ? &wrs[i + 1] : NULL };
	}
	if (post_send(&p.a, wrs))
		goto out;
	extra = (struct ibv_send_wr){ .wr_id = 99, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND,
				      .send_flags = IBV_SEND_SIGNALED };
	err = ibv_post_send(p.a.qp, &extra, &bad);
	if (err != ENOMEM || bad != &extra) {
		fail("WR %u on a send queue of %u: %s, bad_wr %s", depth + 1, depth, err ? strerror(err) : "accepted",
		     bad == &extra ? "names it" : "does not name it");
		goto out;
	}
	for (uint32_t i = 0; i < depth; i++)
		if (post_recv(&p.b, 200 + i, 0, 64))
			goto out;
	if (expect_wc(p.a.scq, 100 + depth - 1, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL))
		goto out;
	ret = 0;
out:
	free(wrs);
	pair_close(&p);
	return ret;
}

/* A zero-length RDMA WRITE with immediate consumes a receive (byte_len 0); a plain one does not. */
static int zero_length_write_with_imm(void)
{
	struct pair p;
	struct ibv_wc wc;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 31, 0, 64))
		goto out;
	struct ibv_send_wr plain = { .wr_id = 32, .num_sge = 0, .opcode = IBV_WR_RDMA_WRITE, .send_flags = IBV_SEND_SIGNALED,
				     .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf, .rkey = p.b.mr->rkey } };
	struct ibv_send_wr imm = plain;

	imm.wr_id = 33;
	imm.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
	imm.imm_data = htobe32(0x5eed);
	if (post_send(&p.a, &plain) || expect_wc(p.a.scq, 32, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, NULL) ||
	    poll_none(p.b.rcq, 100))
		goto out;
	if (post_send(&p.a, &imm) || expect_wc(p.a.scq, 33, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, NULL) ||
	    expect_wc(p.b.rcq, 31, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, 0, &wc))
		goto out;
	if (!(wc.wc_flags & IBV_WC_WITH_IMM) || be32toh(wc.imm_data) != 0x5eed) {
		fail("immediate: flags 0x%x data 0x%x", wc.wc_flags, be32toh(wc.imm_data));
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* An RDMA WRITE with a deregistered rkey fails remotely; the QP goes to ERR and flushes. */
static int stale_rkey(void)
{
	struct pair p;
	int ret = -1;
	uint32_t rkey;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	rkey = p.b.mr->rkey;
	ibv_dereg_mr(p.b.mr);
	p.b.mr = NULL;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 64, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 11, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf, .rkey = rkey } };
	struct ibv_send_wr next = wr;

	next.wr_id = 12;
	wr.next = &next;
	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 11, IBV_WC_REM_ACCESS_ERR, -1, -1, NULL) ||
	    expect_wc(p.a.scq, 12, IBV_WC_WR_FLUSH_ERR, -1, -1, NULL))
		goto out;
	struct ibv_qp_attr qa;
	struct ibv_qp_init_attr qi;

	if (ibv_query_qp(p.a.qp, &qa, IBV_QP_STATE, &qi) || qa.qp_state != IBV_QPS_ERR) {
		fail("requester QP state %d after a remote access error", qa.qp_state);
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* A bad lkey is a local protection error on the sender alone. */
static int bad_lkey(void)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 1, 0, 64))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 64, .lkey = p.a.mr->lkey ^ 0x5a5a00 };
	struct ibv_send_wr wr = { .wr_id = 13, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr) ||
	    expect_wc(p.a.scq, 13, rxe_tolerances ? IBV_WC_LOC_QP_OP_ERR : IBV_WC_LOC_PROT_ERR, -1, -1, NULL))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* Unsignalled WRs complete silently; a signalled one after them reports alone. */
static int signaling_rules(void)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 16, .lkey = p.a.mr->lkey };
	struct ibv_send_wr w[3];

	for (int i = 0; i < 3; i++) {
		w[i] = (struct ibv_send_wr){ .wr_id = 20 + i, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE,
					     .send_flags = i == 2 ? IBV_SEND_SIGNALED : 0, .next = i < 2 ? &w[i + 1] : NULL,
					     .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf, .rkey = p.b.mr->rkey } };
	}
	if (post_send(&p.a, w) || expect_wc(p.a.scq, 22, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, NULL) ||
	    poll_none(p.a.scq, 100))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* A SEND to a QP with no receive posted and rnr_retry 0 fails with RNR_RETRY_EXC_ERR. */
static int rnr_retry_exceeded(void)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 0))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 16, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 30, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 30, IBV_WC_RNR_RETRY_EXC_ERR, -1, -1, NULL))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* A SEND larger than the receive buffer: LOC_LEN_ERR on the receiver, a remote error on the sender. */
static int receive_too_small(void)
{
	struct pair p;
	int ret = -1;
	struct ibv_wc wc;

	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 40, 0, 100))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 200, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 41, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr) ||
	    expect_wc(p.b.rcq, 40, rxe_tolerances ? IBV_WC_LOC_QP_OP_ERR : IBV_WC_LOC_LEN_ERR, -1, -1, NULL) ||
	    poll_one(p.a.scq, &wc))
		goto out;
	if (wc.wr_id != 41 || wc.status == IBV_WC_SUCCESS) {
		fail("sender: wr %" PRIu64 " status %s", wc.wr_id, ibv_wc_status_str(wc.status));
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* Moving a QP with outstanding receives to ERR flushes them in order. */
static int qp_error_flush(void)
{
	struct pair p;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	for (int i = 0; i < 3; i++)
		if (post_recv(&p.b, 50 + i, i * 64, 64))
			goto out;
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_ERR };

	if (ibv_modify_qp(p.b.qp, &a, IBV_QP_STATE)) {
		fail("modify to ERR: %s", strerror(errno));
		goto out;
	}
	for (int i = 0; i < 3; i++)
		if (expect_wc(p.b.rcq, 50 + i, IBV_WC_WR_FLUSH_ERR, -1, -1, NULL))
			goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* RESET -> RTR skips INIT: refused, and the QP stays in RESET. */
static int modify_qp_rules(void)
{
	struct pair p = { .type = IBV_QPT_RC };
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024 };
	struct ibv_qp_init_attr qi;
	int ret = -1;

	p.pd = ibv_alloc_pd(ctx);
	if (!p.pd || side_open(&p, &p.a, ALL_ACCESS, 1, NULL))
		goto out;
	if (!ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE | IBV_QP_PATH_MTU)) {
		fail("RESET -> RTR was accepted");
		goto out;
	}
	if (ibv_query_qp(p.a.qp, &a, IBV_QP_STATE, &qi) || a.qp_state != IBV_QPS_RESET) {
		fail("state %d after a refused transition", a.qp_state);
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* A PD with an MR on it cannot be freed; after the MR goes, it can. */
static int destroy_pd_in_use(void)
{
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	void *buf = aligned_alloc(4096, 4096);
	struct ibv_mr *mr;

	CHECK(pd && buf, "ibv_alloc_pd: %s", strerror(errno));
	mr = ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_LOCAL_WRITE);
	CHECK(mr, "ibv_reg_mr: %s", strerror(errno));
	CHECK(ibv_dealloc_pd(pd) != 0, "a PD with an MR was freed");
	CHECK(!ibv_dereg_mr(mr), "ibv_dereg_mr: %s", strerror(errno));
	CHECK(!ibv_dealloc_pd(pd), "ibv_dealloc_pd after its MR went: %s", strerror(errno));
	free(buf);
	return 0;
}

/* An armed CQ raises one completion event on its channel. */
static int cq_arming(void)
{
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pair p;
	struct ibv_cq *ev_cq;
	struct pollfd pfd;
	void *ev_ctx;
	int ret = -1;

	CHECK(ch, "ibv_create_comp_channel: %s", strerror(errno));
	if (pair_open_ch(&p, IBV_QPT_RC, 7, ch))
		goto out;
	if (ibv_req_notify_cq(p.b.rcq, 0)) {
		fail("ibv_req_notify_cq: %s", strerror(errno));
		goto out;
	}
	if (post_recv(&p.b, 60, 0, 64))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 61, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr))
		goto out;
	pfd = (struct pollfd){ .fd = ch->fd, .events = POLLIN };
	if (poll(&pfd, 1, POLL_TIMEOUT_MS) != 1) {
		fail("no completion event within %d ms", POLL_TIMEOUT_MS);
		goto out;
	}
	if (ibv_get_cq_event(ch, &ev_cq, &ev_ctx) || ev_cq != p.b.rcq) {
		fail("ibv_get_cq_event: wrong CQ or %s", strerror(errno));
		goto out;
	}
	ibv_ack_cq_events(ev_cq, 1);
	if (expect_wc(p.b.rcq, 60, IBV_WC_SUCCESS, IBV_WC_RECV, 8, NULL))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	ibv_destroy_comp_channel(ch);
	return ret;
}

/*
 * A CQ armed for solicited completions only stays quiet for a plain SEND
 * (its completion is still there to poll) and wakes for a solicited one.
 */
static int cq_solicited_only(void)
{
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pair p;
	struct ibv_cq *ev_cq;
	struct pollfd pfd;
	void *ev_ctx;
	int ret = -1;

	CHECK(ch, "ibv_create_comp_channel: %s", strerror(errno));
	if (pair_open_ch(&p, IBV_QPT_RC, 7, ch))
		goto out;
	if (ibv_req_notify_cq(p.b.rcq, 1)) {
		fail("ibv_req_notify_cq(solicited_only): %s", strerror(errno));
		goto out;
	}
	if (post_recv(&p.b, 70, 0, 64) || post_recv(&p.b, 71, 64, 64))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 72, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 72, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 70, IBV_WC_SUCCESS, IBV_WC_RECV, 8, NULL))
		goto out;
	pfd = (struct pollfd){ .fd = ch->fd, .events = POLLIN };
	if (poll(&pfd, 1, 200) != 0) {
		fail("an event for an unsolicited SEND on a CQ armed for solicited ones");
		goto out;
	}
	wr.wr_id = 73;
	wr.send_flags |= IBV_SEND_SOLICITED;
	if (post_send(&p.a, &wr))
		goto out;
	if (poll(&pfd, 1, POLL_TIMEOUT_MS) != 1) {
		fail("no event for a solicited SEND within %d ms", POLL_TIMEOUT_MS);
		goto out;
	}
	if (ibv_get_cq_event(ch, &ev_cq, &ev_ctx) || ev_cq != p.b.rcq) {
		fail("ibv_get_cq_event: wrong CQ or %s", strerror(errno));
		goto out;
	}
	ibv_ack_cq_events(ev_cq, 1);
	struct ibv_wc wc;

	if (expect_wc(p.b.rcq, 71, IBV_WC_SUCCESS, IBV_WC_RECV, 8, &wc) || expect_wc(p.a.scq, 73, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	ibv_destroy_comp_channel(ch);
	return ret;
}

/* An atomic at a remote address that is not 8-byte aligned is an invalid request: an error completion, memory untouched. */
static int atomic_misaligned(void)
{
	struct pair p;
	struct ibv_wc wc;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	memset(p.b.buf, 0x11, 16);
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 80, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_ATOMIC_FETCH_AND_ADD,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.atomic = { .remote_addr = (uintptr_t)p.b.buf + 4, .rkey = p.b.mr->rkey, .compare_add = 1 } };

	struct ibv_send_wr *bad;
	int err = ibv_post_send(p.a.qp, &wr, &bad);

	/* refused at once (rxe: EINVAL), or an error completion (the responder's NAK, or the requester's own check) */
	if (err == EINVAL) {
		ret = 0;
		goto out;
	}
	if (err) {
		fail("ibv_post_send: %s", strerror(err));
		goto out;
	}
	if (poll_one(p.a.scq, &wc))
		goto out;
	if (wc.wr_id != 80 || (wc.status != IBV_WC_REM_INV_REQ_ERR && wc.status != IBV_WC_LOC_QP_OP_ERR)) {
		fail("misaligned atomic: wr %" PRIu64 " status %s (expected an invalid-request error)", wc.wr_id,
		     ibv_wc_status_str(wc.status));
		goto out;
	}
	ret = 0;
out:
	if (ret == 0)
		for (int i = 0; i < 16; i++)
			if (p.b.buf && p.b.buf[i] != 0x11) {
				ret = fail("responder memory changed at byte %d", i);
				break;
			}
	pair_close(&p);
	return ret;
}

/* Sends are refused before RTS (a QP in INIT or RTR has no send queue yet); receives are taken from INIT on. */
static int post_before_rts(void)
{
	struct pair p = { 0 };
	struct ibv_send_wr *bad;
	int ret = -1, err;

	p.type = IBV_QPT_RC;
	p.pd = ibv_alloc_pd(ctx);
	CHECK(p.pd, "ibv_alloc_pd: %s", strerror(errno));
	if (side_open(&p, &p.a, ALL_ACCESS, 0x1234, NULL))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 90, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1, .qp_access_flags = ALL_ACCESS };

	if (ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
		fail("modify to INIT: %s", strerror(errno));
		goto out;
	}
	err = ibv_post_send(p.a.qp, &wr, &bad);
	if (err == 0) {
		fail("ibv_post_send accepted a WR on a QP in INIT");
		goto out;
	}
	if (post_recv(&p.a, 91, 0, 64))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/*
 * Local write access is checked where data lands: an RDMA READ whose
 * local buffer's MR lacks LOCAL_WRITE fails on the requester; a SEND into
 * a receive buffer whose MR lacks it fails the receive, and the sender
 * hears of it. Neither buffer changes.
 */
static int local_write_access(void)
{
	struct pair p;
	struct ibv_mr *ro_a = NULL, *ro_b = NULL;
	struct ibv_wc wc;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	memset(p.a.buf + 4096, 0x22, 64);
	memset(p.b.buf + 4096, 0x33, 64);
	ro_a = ibv_reg_mr(p.pd, p.a.buf + 4096, 4096, 0);
	ro_b = ibv_reg_mr(p.pd, p.b.buf + 4096, 4096, 0);
	if (!ro_a || !ro_b) {
		fail("ibv_reg_mr (local read only): %s", strerror(errno));
		goto out;
	}
	struct ibv_sge rsge = { .addr = (uintptr_t)p.a.buf + 4096, .length = 64, .lkey = ro_a->lkey };
	struct ibv_send_wr rd = { .wr_id = 100, .sg_list = &rsge, .num_sge = 1, .opcode = IBV_WR_RDMA_READ,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf, .rkey = p.b.mr->rkey } };

	if (post_send(&p.a, &rd) || poll_one(p.a.scq, &wc))
		goto out;
	if (wc.wr_id != 100 || wc.status != IBV_WC_LOC_PROT_ERR) {
		fail("READ into a buffer without LOCAL_WRITE: wr %" PRIu64 " %s (expected a local protection error)",
		     wc.wr_id, ibv_wc_status_str(wc.status));
		goto out;
	}
	for (int i = 0; i < 64; i++)
		if (p.a.buf[4096 + i] != 0x22) {
			fail("the read-only READ buffer changed at byte %d", i);
			goto out;
		}
	ibv_dereg_mr(ro_a);
	ibv_dereg_mr(ro_b);
	ro_a = ro_b = NULL;
	pair_close(&p);

	/* a fresh pair: the READ's error moved the first one to ERR */
	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	memset(p.b.buf + 4096, 0x33, 64);
	ro_b = ibv_reg_mr(p.pd, p.b.buf + 4096, 4096, 0);
	CHECK(ro_b, "ibv_reg_mr (local read only): %s", strerror(errno));
	struct ibv_sge rcv = { .addr = (uintptr_t)p.b.buf + 4096, .length = 64, .lkey = ro_b->lkey };
	struct ibv_recv_wr rwr = { .wr_id = 101, .sg_list = &rcv, .num_sge = 1 }, *rbad;

	CHECK(!ibv_post_recv(p.b.qp, &rwr, &rbad), "ibv_post_recv: %s", strerror(errno));
	struct ibv_sge ssge = { .addr = (uintptr_t)p.a.buf, .length = 64, .lkey = p.a.mr->lkey };
	struct ibv_send_wr snd = { .wr_id = 102, .sg_list = &ssge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };
	struct ibv_wc rw;

	if (post_send(&p.a, &snd) || poll_one(p.a.scq, &wc) || poll_one(p.b.rcq, &rw))
		goto out;
	/* the receiver's own fault (rxe says LOC_QP_OP_ERR for it), which the sender hears as remote operational */
	enum ibv_wc_status receiver = rxe_tolerances ? IBV_WC_LOC_QP_OP_ERR : IBV_WC_LOC_PROT_ERR;

	if (wc.wr_id != 102 || wc.status != IBV_WC_REM_OP_ERR || rw.wr_id != 101 || rw.status != receiver) {
		fail("SEND into a receive buffer without LOCAL_WRITE: sender %s, receiver %s (expected %s, %s)",
		     ibv_wc_status_str(wc.status), ibv_wc_status_str(rw.status), ibv_wc_status_str(IBV_WC_REM_OP_ERR),
		     ibv_wc_status_str(receiver));
		goto out;
	}
	for (int i = 0; i < 64; i++)
		if (p.b.buf[4096 + i] != 0x33) {
			fail("the read-only receive buffer changed at byte %d", i);
			goto out;
		}
	ret = 0;
out:
	if (ro_a)
		ibv_dereg_mr(ro_a);
	if (ro_b)
		ibv_dereg_mr(ro_b);
	pair_close(&p);
	return ret;
}

/* A UD message longer than the port's MTU cannot go out: refused at post, or a LOC_LEN_ERR completion. */
static int ud_message_too_long(void)
{
	struct pair p;
	struct ibv_ah *ah = NULL;
	struct ibv_send_wr *bad;
	struct ibv_wc wc;
	uint32_t mtu = 128u << port_attr.active_mtu;
	int ret = -1, err;

	if (pair_open(&p, IBV_QPT_UD, 7) || post_recv(&p.b, 110, 0, 40 + mtu + 64))
		goto out;
	ah = ah_to_self(p.pd);
	if (!ah)
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = mtu + 1, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 111, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	wr.wr.ud.ah = ah;
	wr.wr.ud.remote_qpn = p.b.qp->qp_num;
	wr.wr.ud.remote_qkey = QKEY;
	err = ibv_post_send(p.a.qp, &wr, &bad);
	if (err == 0) {
		if (poll_one(p.a.scq, &wc))
			goto out;
		if (rxe_tolerances && wc.wr_id == 111 && wc.status == IBV_WC_SUCCESS) {
			/* rxe sends UD messages up to its netdev's MTU, past the port's active MTU */
			ret = 0;
			goto out;
		}
		if (wc.wr_id != 111 || wc.status != IBV_WC_LOC_LEN_ERR) {
			fail("UD SEND of MTU + 1 = %u bytes: %s (expected a local length error)", mtu + 1, ibv_wc_status_str(wc.status));
			goto out;
		}
	} else if (err != EINVAL) {
		fail("UD SEND of MTU + 1 bytes refused with %s (expected EINVAL)", strerror(err));
		goto out;
	}
	if (poll_none(p.b.rcq, 100))
		goto out;
	ret = 0;
out:
	if (ah)
		ibv_destroy_ah(ah);
	pair_close(&p);
	return ret;
}

/*
 * A chain with a bad WR in the middle: the WRs before it are posted and
 * complete, the call fails naming it, and nothing after it runs.
 */
static int bad_wr_in_chain(void)
{
	struct pair p;
	struct ibv_send_wr *bad = NULL;
	struct ibv_sge sges[64];
	int ret = -1, err;

	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 120, 0, 64) || post_recv(&p.b, 121, 64, 64))
		goto out;
	for (int i = 0; i < 64; i++)
		sges[i] = (struct ibv_sge){ .addr = (uintptr_t)p.a.buf, .length = 1, .lkey = p.a.mr->lkey };
	struct ibv_send_wr w3 = { .wr_id = 124, .sg_list = sges, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };
	struct ibv_send_wr w2 = { .wr_id = 123, .sg_list = sges, .num_sge = 64, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED, .next = &w3 };
	struct ibv_send_wr w1 = { .wr_id = 122, .sg_list = sges, .num_sge = 1, .opcode = IBV_WR_SEND,
				  .send_flags = IBV_SEND_SIGNALED, .next = &w2 };

	err = ibv_post_send(p.a.qp, &w1, &bad);
	if (err == 0 || bad != &w2) {
		fail("a WR with 64 SGEs (max_send_sge %d) in the middle: %s, bad_wr %s", dev_attr.orig_attr.max_sge,
		     err ? strerror(err) : "accepted", bad == &w2 ? "names it" : "does not name it");
		goto out;
	}
	if (expect_wc(p.a.scq, 122, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 120, IBV_WC_SUCCESS, IBV_WC_RECV, 1, NULL) || poll_none(p.a.scq, 100) ||
	    poll_none(p.b.rcq, 1))
		goto out;
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/*
 * A QP comes back from ERR through RESET: both ends are reset and
 * connected again with new PSNs, and a SEND crosses as on a new QP.
 */
static int qp_reuse_after_reset(void)
{
	struct pair p;
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_ERR };
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7) || post_recv(&p.b, 130, 0, 64))
		goto out;
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 32, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 131, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 131, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 130, IBV_WC_SUCCESS, IBV_WC_RECV, 32, NULL))
		goto out;
	/* both to ERR (a receive left behind is flushed), then RESET */
	if (post_recv(&p.b, 132, 0, 64))
		goto out;
	CHECK(!ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE) && !ibv_modify_qp(p.b.qp, &a, IBV_QP_STATE), "modify to ERR: %s", strerror(errno));
	if (expect_wc(p.b.rcq, 132, IBV_WC_WR_FLUSH_ERR, -1, -1, NULL))
		goto out;
	a.qp_state = IBV_QPS_RESET;
	CHECK(!ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE) && !ibv_modify_qp(p.b.qp, &a, IBV_QP_STATE), "modify to RESET: %s", strerror(errno));
	p.a.psn = 0x777;
	p.b.psn = 0xabcdef;
	if (connect_qp(&p, &p.a, &p.b, ALL_ACCESS, 7) || connect_qp(&p, &p.b, &p.a, ALL_ACCESS, 7))
		goto out;
	fill(p.a.buf, 4000, 9);
	sge.length = 4000;
	wr.wr_id = 134;
	if (post_recv(&p.b, 133, 0, 4096) || post_send(&p.a, &wr) ||
	    expect_wc(p.a.scq, 134, IBV_WC_SUCCESS, IBV_WC_SEND, -1, NULL) ||
	    expect_wc(p.b.rcq, 133, IBV_WC_SUCCESS, IBV_WC_RECV, 4000, NULL))
		goto out;
	if (memcmp(p.a.buf, p.b.buf, 4000)) {
		fail("bytes differ after the QPs were reused");
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* RTS -> RTS takes the attributes the verbs allow there (access flags, min RNR timer) and refuses others (path MTU). */
static int modify_rts_to_rts(void)
{
	struct pair p;
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr qi;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTS;
	a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ;
	a.min_rnr_timer = 12;
	if (ibv_modify_qp(p.b.qp, &a, IBV_QP_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER)) {
		fail("RTS -> RTS with access flags and min RNR timer: %s", strerror(errno));
		goto out;
	}
	memset(&a, 0, sizeof(a));
	if (ibv_query_qp(p.b.qp, &a, IBV_QP_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER, &qi) ||
	    a.qp_state != IBV_QPS_RTS || a.qp_access_flags != (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ) ||
	    a.min_rnr_timer != 12) {
		fail("after RTS -> RTS: state %d access 0x%x min_rnr_timer %d", a.qp_state, a.qp_access_flags, a.min_rnr_timer);
		goto out;
	}
	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTS;
	a.path_mtu = IBV_MTU_512;
	if (!ibv_modify_qp(p.b.qp, &a, IBV_QP_STATE | IBV_QP_PATH_MTU)) {
		fail("RTS -> RTS changing the path MTU was accepted");
		goto out;
	}
	/* the new access flags rule: a WRITE into b is now refused */
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 140, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE, .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf, .rkey = p.b.mr->rkey } };
	struct ibv_wc wc;

	if (post_send(&p.a, &wr) || poll_one(p.a.scq, &wc))
		goto out;
	if (wc.status != IBV_WC_REM_ACCESS_ERR && !(rxe_tolerances && wc.status == IBV_WC_REM_INV_REQ_ERR)) {
		fail("WRITE after REMOTE_WRITE was taken away: %s (expected a remote access error)", ibv_wc_status_str(wc.status));
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* A compare-and-swap that misses returns the original value and leaves memory as it was. */
static int atomic_cas_miss(void)
{
	struct pair p;
	uint64_t *remote, *local;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	remote = (uint64_t *)(p.b.buf + 128);
	local = (uint64_t *)p.a.buf;
	*remote = 7;
	*local = 0;
	struct ibv_sge sge = { .addr = (uintptr_t)local, .length = 8, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 150, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_ATOMIC_CMP_AND_SWP,
				  .send_flags = IBV_SEND_SIGNALED,
				  .wr.atomic = { .remote_addr = (uintptr_t)remote, .rkey = p.b.mr->rkey, .compare_add = 8, .swap = 99 } };

	if (post_send(&p.a, &wr) || expect_wc(p.a.scq, 150, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, -1, NULL))
		goto out;
	if (*local != 7 || *remote != 7) {
		fail("missed compare: original %" PRIu64 ", remote now %" PRIu64, *local, *remote);
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/*
 * An RDMA WRITE with immediate needs a receive WQE: with none posted the
 * responder sends RNR NAKs and the requester retries until one is posted;
 * then the data and the immediate arrive once.
 */
static int write_with_imm_rnr(void)
{
	struct pair p;
	struct ibv_wc wc;
	int ret = -1;

	if (pair_open(&p, IBV_QPT_RC, 7))
		goto out;
	fill(p.a.buf, 3000, 17);
	struct ibv_sge sge = { .addr = (uintptr_t)p.a.buf, .length = 3000, .lkey = p.a.mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 160, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
				  .send_flags = IBV_SEND_SIGNALED, .imm_data = htobe32(0xfeed),
				  .wr.rdma = { .remote_addr = (uintptr_t)p.b.buf + 8192, .rkey = p.b.mr->rkey } };

	if (post_send(&p.a, &wr) || poll_none(p.a.scq, 150) || post_recv(&p.b, 161, 0, 0))
		goto out;
	if (expect_wc(p.a.scq, 160, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, NULL) ||
	    expect_wc(p.b.rcq, 161, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, 3000, &wc) || poll_none(p.b.rcq, 50))
		goto out;
	if (be32toh(wc.imm_data) != 0xfeed || memcmp(p.b.buf + 8192, p.a.buf, 3000)) {
		fail("after the RNR wait: imm 0x%x, bytes %s", be32toh(wc.imm_data),
		     memcmp(p.b.buf + 8192, p.a.buf, 3000) ? "differ" : "match");
		goto out;
	}
	ret = 0;
out:
	pair_close(&p);
	return ret;
}

/* Two QP pairs whose receives complete on one CQ: each completion names its own QP. */
static int shared_cq(void)
{
	struct pair p1, p2;
	struct ibv_cq *cq = NULL;
	struct ibv_qp *qps[2] = { NULL, NULL };
	int ret = -1;

	memset(&p2, 0, sizeof(p2));
	if (pair_open(&p1, IBV_QPT_RC, 7) || pair_open(&p2, IBV_QPT_RC, 7))
		goto out;
	/* b's receive CQs stay as they are; a shared one is made for two extra receivers' view */
	cq = p1.b.rcq;
	qps[0] = p1.b.qp;
	qps[1] = p2.b.qp;
	/* p2's receiver gets its own QP on p1's receive CQ: recreate p2.b.qp with recv_cq = cq */
	{
		struct ibv_qp_init_attr init = {
			.qp_type = IBV_QPT_RC, .send_cq = p2.b.scq, .recv_cq = cq,
			.cap = { .max_send_wr = 8, .max_recv_wr = 8, .max_send_sge = 1, .max_recv_sge = 1 },
		};
		struct ibv_qp *q = ibv_create_qp(p2.pd, &init);

		CHECK(q, "ibv_create_qp on a shared CQ: %s", strerror(errno));
		ibv_destroy_qp(p2.b.qp);
		p2.b.qp = q;
		qps[1] = q;
		/* p2's a must reconnect to the new QP: reset it first */
		struct ibv_qp_attr r = { .qp_state = IBV_QPS_RESET };

		CHECK(!ibv_modify_qp(p2.a.qp, &r, IBV_QP_STATE), "reset: %s", strerror(errno));
		if (connect_qp(&p2, &p2.a, &p2.b, ALL_ACCESS, 7) || connect_qp(&p2, &p2.b, &p2.a, ALL_ACCESS, 7))
			goto out;
	}
	if (post_recv(&p1.b, 170, 0, 64) || post_recv(&p2.b, 171, 0, 64))
		goto out;
	struct ibv_sge s1 = { .addr = (uintptr_t)p1.a.buf, .length = 11, .lkey = p1.a.mr->lkey };
	struct ibv_sge s2 = { .addr = (uintptr_t)p2.a.buf, .length = 22, .lkey = p2.a.mr->lkey };
	struct ibv_send_wr w1 = { .wr_id = 172, .sg_list = &s1, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };
	struct ibv_send_wr w2 = { .wr_id = 173, .sg_list = &s2, .num_sge = 1, .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED };

	if (post_send(&p1.a, &w1) || post_send(&p2.a, &w2))
		goto out;
	for (int i = 0; i < 2; i++) {
		struct ibv_wc wc;

		if (poll_one(cq, &wc))
			goto out;
		int k = wc.wr_id == 170 ? 0 : wc.wr_id == 171 ? 1 : -1;

		if (k < 0 || wc.status != IBV_WC_SUCCESS || wc.qp_num != qps[k]->qp_num || wc.byte_len != (k ? 22u : 11u)) {
			fail("completion on the shared CQ: wr %" PRIu64 " %s qp 0x%x len %u", wc.wr_id,
			     ibv_wc_status_str(wc.status), wc.qp_num, wc.byte_len);
			goto out;
		}
	}
	if (poll_none(p2.b.rcq, 50))
		goto out;
	ret = 0;
out:
	pair_close(&p2);
	pair_close(&p1);
	return ret;
}

/* PDs: exactly max_pd can be allocated when the device reports a small limit; with a huge one, at least LIMIT_PROBE. */
#define LIMIT_PROBE 1024
static int limit_pd(void)
{
	int max = dev_attr.orig_attr.max_pd, want, n = 0;
	struct ibv_pd **pds;

	CHECK(max > 0, "max_pd %d", max);
	want = max <= LIMIT_PROBE ? max + 1 : LIMIT_PROBE;
	pds = calloc(want, sizeof(*pds));
	CHECK(pds, "out of memory");
	while (n < want && (pds[n] = ibv_alloc_pd(ctx)))
		n++;
	for (int i = 0; i < n; i++)
		ibv_dealloc_pd(pds[i]);
	free(pds);
	printf("info pds_allocated=%d\n", n);
	if (max <= LIMIT_PROBE)
		CHECK(n == max, "allocated %d PDs, max_pd is %d", n, max);
	else
		CHECK(n == LIMIT_PROBE, "only %d PDs of max_pd %d", n, max);
	return 0;
}

struct scenario {
	const char *name;
	int (*run)(void);
};

static const struct scenario scenarios[] = {
	{ "queryBasics", query_basics },
	{ "rcSendRecv", rc_send_recv },
	{ "rcSendWithImm", rc_send_with_imm },
	{ "ucSendRecv", uc_send_recv },
	{ "udSendRecv", ud_send_recv },
	{ "udReplyFromWc", ud_reply_from_wc },
	{ "zeroLengthSend", zero_length_send },
	{ "rdmaWrite", rdma_write },
	{ "rdmaWriteWithImm", rdma_write_with_imm },
	{ "rdmaRead", rdma_read },
	{ "atomicCompareAndSwap", atomic_cmp_swap },
	{ "atomicFetchAndAdd", atomic_fetch_add },
	{ "multiSgeSendRecv", multi_sge },
	{ "inlineSend", inline_send },
	{ "queryQpAttributes", query_qp_attributes },
	{ "sendQueueFull", send_queue_full },
	{ "zeroLengthWriteWithImm", zero_length_write_with_imm },
	{ "staleRkey", stale_rkey },
	{ "badLkey", bad_lkey },
	{ "signalingRules", signaling_rules },
	{ "rnrRetryExceeded", rnr_retry_exceeded },
	{ "receiveTooSmall", receive_too_small },
	{ "qpErrorFlush", qp_error_flush },
	{ "modifyQpRules", modify_qp_rules },
	{ "destroyPdInUse", destroy_pd_in_use },
	{ "cqArmingAndInterrupts", cq_arming },
	{ "cqSolicitedOnly", cq_solicited_only },
	{ "atomicMisaligned", atomic_misaligned },
	{ "postBeforeRts", post_before_rts },
	{ "localWriteAccess", local_write_access },
	{ "udMessageTooLong", ud_message_too_long },
	{ "badWrInChain", bad_wr_in_chain },
	{ "qpReuseAfterReset", qp_reuse_after_reset },
	{ "modifyRtsToRts", modify_rts_to_rts },
	{ "atomicCasMiss", atomic_cas_miss },
	{ "writeWithImmRnr", write_with_imm_rnr },
	{ "sharedCq", shared_cq },
	{ "limitPd", limit_pd },
};

static void usage(void)
{
	fprintf(stderr, "usage: vrdma_conformance -d DEVICE [-g GID_INDEX] [-s SCENARIO] [-r] [-v]\nscenarios:");
	for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
		fprintf(stderr, " %s", scenarios[i].name);
	fprintf(stderr, "\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *dev_name = NULL, *only = NULL;
	struct ibv_device **list;
	int opt, failed = 0, run = 0, num;

	while ((opt = getopt(argc, argv, "d:g:s:rv")) != -1) {
		switch (opt) {
		case 'd': dev_name = optarg; break;
		case 'g': gid_index = atoi(optarg); break;
		case 's': only = optarg; break;
		case 'r': rxe_tolerances = true; break;
		case 'v': verbose = true; break;
		default: usage();
		}
	}
	if (!dev_name)
		usage();
	setvbuf(stdout, NULL, _IOLBF, 0);
	list = ibv_get_device_list(&num);
	if (!list) {
		printf("Bail out! ibv_get_device_list: %s\n", strerror(errno));
		return 100;
	}
	for (int i = 0; i < num && !ctx; i++)
		if (!strcmp(ibv_get_device_name(list[i]), dev_name))
			ctx = ibv_open_device(list[i]);
	ibv_free_device_list(list);
	if (!ctx) {
		printf("Bail out! no device %s among %d\n", dev_name, num);
		return 100;
	}
	if (ibv_query_device_ex(ctx, NULL, &dev_attr) || ibv_query_port(ctx, 1, &port_attr) ||
	    ibv_query_gid(ctx, 1, gid_index, &gid)) {
		printf("Bail out! querying %s: %s\n", dev_name, strerror(errno));
		return 100;
	}
	for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
		const struct scenario *s = &scenarios[i];

		if (only && strcmp(only, s->name))
			continue;
		failure[0] = '\0';
		uint64_t t0 = now_ms();
		int r = s->run();

		run++;
		if (r) {
			failed++;
			printf("not ok %d %s # %s\n", run, s->name, failure[0] ? failure : "failed");
		} else {
			printf("ok %d %s%s", run, s->name, verbose ? "" : "\n");
			if (verbose)
				printf(" # %" PRIu64 " ms\n", now_ms() - t0);
		}
	}
	printf("1..%d\n# %d passed, %d failed\n", run, run - failed, failed);
	ibv_close_device(ctx);
	return failed > 100 ? 100 : failed;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * uverbs_smoke: drives a virtio_rdma device through /dev/infiniband/uverbs0
 * with the kernel's legacy write() command ABI, so the driver can be tested
 * in a guest that has no rdma-core. Built static on the host by
 * test/vm/virtio-rdma-driver.test.ts.
 *
 *   uverbs_smoke info    device and port attributes, one "D key=value" line each
 *   uverbs_smoke rc      two RC QPs of this device: SEND, inline SEND,
 *                        RDMA WRITE with immediate, RDMA READ; checks the data
 *   uverbs_smoke ud      two UD QPs: a SEND through an AH; checks GRH + data
 *   uverbs_smoke notify  arms a CQ bound to a completion channel, sends,
 *                        and waits for the event (device interrupt ->
 *                        comp_handler -> channel), then re-arms
 *   uverbs_smoke hold    opens PD, CQ, MR, QP, prints READY, waits for
 *                        /tmp/go, then reports what a command returns
 *
 * Exit status 0 only when everything checked out; "FAIL ..." says why.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <rdma/ib_user_verbs.h>

/* verbs numbering the uapi header does not name */
enum {
	SEND_SIGNALED = 2,
	SEND_INLINE = 8,
	WC_RECV = 128,
	WC_RECV_RDMA_WITH_IMM = 129,
	WC_FLAG_GRH = 1,
	WC_FLAG_WITH_IMM = 2,
};

static int fd = -1;

static void fail(const char *fmt, ...)
{
	va_list ap;

	printf("FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	exit(1);
}

/* one legacy command: header, then the command struct; returns -errno */
static int cmd(uint32_t command, void *req, size_t req_len, void *resp, size_t resp_len)
{
	struct ib_uverbs_cmd_hdr *hdr;
	size_t len = sizeof(*hdr) + req_len;
	char *buf = calloc(1, len);
	ssize_t n;

	if (!buf)
		fail("calloc");
	hdr = (void *)buf;
	hdr->command = command;
	hdr->in_words = len / 4;
	hdr->out_words = resp_len / 4;
	memcpy(buf + sizeof(*hdr), req, req_len);
	/* every command with a response starts with its address */
	if (resp_len)
		*(uint64_t *)(buf + sizeof(*hdr)) = (uintptr_t)resp;
	n = write(fd, buf, len);
	free(buf);
	return n == (ssize_t)len ? 0 : -errno;
}

#define CMD(c, req, resp) cmd(IB_USER_VERBS_CMD_##c, &(req), sizeof(req), resp, sizeof(*(resp)))

static void must(int rc, const char *what)
{
	if (rc)
		fail("%s: %s", what, strerror(-rc));
}

static void open_dev(void)
{
	struct ib_uverbs_get_context req = {};
	struct ib_uverbs_get_context_resp resp;

	fd = open("/dev/infiniband/uverbs0", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		fail("open /dev/infiniband/uverbs0: %s", strerror(errno));
	must(CMD(GET_CONTEXT, req, &resp), "GET_CONTEXT");
}

static void query(struct ib_uverbs_query_device_resp *d, struct ib_uverbs_query_port_resp *p)
{
	struct ib_uverbs_query_device qd = {};
	struct ib_uverbs_query_port qp = { .port_num = 1 };

	must(CMD(QUERY_DEVICE, qd, d), "QUERY_DEVICE");
	must(CMD(QUERY_PORT, qp, p), "QUERY_PORT");
}

static uint32_t alloc_pd(void)
{
	struct ib_uverbs_alloc_pd req = {};
	struct ib_uverbs_alloc_pd_resp resp;

	must(CMD(ALLOC_PD, req, &resp), "ALLOC_PD");
	return resp.pd_handle;
}

static uint32_t create_cq(uint32_t cqe)
{
	struct ib_uverbs_create_cq req = { .cqe = cqe, .comp_channel = -1 };
	struct ib_uverbs_create_cq_resp resp;

	must(CMD(CREATE_CQ, req, &resp), "CREATE_CQ");
	if (resp.cqe < cqe)
		fail("CREATE_CQ granted %u < %u", resp.cqe, cqe);
	return resp.cq_handle;
}

static struct ib_uverbs_reg_mr_resp reg_mr(uint32_t pd, void *addr, size_t len, uint32_t access)
{
	struct ib_uverbs_reg_mr req = {
		.start = (uintptr_t)addr, .length = len, .hca_va = (uintptr_t)addr,
		.pd_handle = pd, .access_flags = access,
	};
	struct ib_uverbs_reg_mr_resp resp;

	must(CMD(REG_MR, req, &resp), "REG_MR");
	return resp;
}

static struct ib_uverbs_create_qp_resp create_qp(uint32_t pd, uint32_t cq, uint8_t type)
{
	struct ib_uverbs_create_qp req = {
		.pd_handle = pd, .send_cq_handle = cq, .recv_cq_handle = cq,
		.max_send_wr = 8, .max_recv_wr = 8, .max_send_sge = 2, .max_recv_sge = 2,
		.max_inline_data = 32, .qp_type = type,
	};
	struct ib_uverbs_create_qp_resp resp;

	must(CMD(CREATE_QP, req, &resp), "CREATE_QP");
	printf("Q qpn=0x%x max_send_wr=%u max_recv_wr=%u max_send_sge=%u max_inline_data=%u\n",
	       resp.qpn, resp.max_send_wr, resp.max_recv_wr, resp.max_send_sge, resp.max_inline_data);
	return resp;
}

static void modify(uint32_t qp, uint32_t mask, struct ib_uverbs_modify_qp *m, const char *what)
{
	m->qp_handle = qp;
	m->attr_mask = mask;
	must(cmd(IB_USER_VERBS_CMD_MODIFY_QP, m, sizeof(*m), NULL, 0), what);
}

static uint8_t gid0[16];

static void read_gid0(void)
{
	unsigned int w[8];
	FILE *f = fopen("/sys/class/infiniband/virtio_rdma0/ports/1/gids/0", "r");
	int i;

	if (!f || fscanf(f, "%x:%x:%x:%x:%x:%x:%x:%x", &w[0], &w[1], &w[2], &w[3], &w[4],
			 &w[5], &w[6], &w[7]) != 8)
		fail("reading gids/0");
	fclose(f);
	for (i = 0; i < 8; i++) {
		gid0[2 * i] = w[i] >> 8;
		gid0[2 * i + 1] = w[i] & 0xff;
	}
}

static void connect_rc(uint32_t qp, uint32_t dest_qpn, uint32_t access)
{
	struct ib_uverbs_modify_qp m = {};

	m.qp_state = 1; /* INIT */
	m.port_num = 1;
	m.qp_access_flags = access;
	modify(qp, 1 | 16 | 32 | 8, &m, "RESET->INIT");

	memset(&m, 0, sizeof(m));
	m.qp_state = 2; /* RTR */
	m.path_mtu = 3;
	m.dest_qp_num = dest_qpn;
	m.rq_psn = 100;
	m.max_dest_rd_atomic = 1;
	m.min_rnr_timer = 1;
	memcpy(m.dest.dgid, gid0, 16);
	m.dest.is_global = 1;
	m.dest.hop_limit = 64;
	m.dest.port_num = 1;
	modify(qp, 1 | (1 << 7) | (1 << 8) | (1 << 20) | (1 << 12) | (1 << 17) | (1 << 15), &m, "INIT->RTR");

	memset(&m, 0, sizeof(m));
	m.qp_state = 3; /* RTS */
	m.sq_psn = 100;
	m.timeout = 14;
	m.retry_cnt = 7;
	m.rnr_retry = 7;
	m.max_rd_atomic = 1;
	modify(qp, 1 | (1 << 16) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 13), &m, "RTR->RTS");
}

struct send_req {
	struct ib_uverbs_post_send ps;
	struct ib_uverbs_send_wr wr;
	struct ib_uverbs_sge sge;
};

static int post_send(uint32_t qp, struct ib_uverbs_send_wr *wr, struct ib_uverbs_sge *sge)
{
	struct send_req r = {};
	struct ib_uverbs_post_send_resp resp;

	r.ps.qp_handle = qp;
	r.ps.wr_count = 1;
	r.ps.sge_count = wr->num_sge;
	r.ps.wqe_size = sizeof(r.wr);
	r.wr = *wr;
	if (sge)
		r.sge = *sge;
	return cmd(IB_USER_VERBS_CMD_POST_SEND, &r, sizeof(r) - (sge ? 0 : sizeof(r.sge)),
		   &resp, sizeof(resp));
}

static void post_recv(uint32_t qp, uint64_t wr_id, struct ib_uverbs_sge *sge)
{
	struct {
		struct ib_uverbs_post_recv pr;
		struct ib_uverbs_recv_wr wr;
		struct ib_uverbs_sge sge;
	} r = {};
	struct ib_uverbs_post_recv_resp resp;

	r.pr.qp_handle = qp;
	r.pr.wr_count = 1;
	r.pr.sge_count = 1;
	r.pr.wqe_size = sizeof(r.wr);
	r.wr.wr_id = wr_id;
	r.wr.num_sge = 1;
	r.sge = *sge;
	must(cmd(IB_USER_VERBS_CMD_POST_RECV, &r, sizeof(r), &resp, sizeof(resp)), "POST_RECV");
}

/* waits for one completion (10 s) and prints it */
static struct ib_uverbs_wc poll_one(uint32_t cq)
{
	struct ib_uverbs_poll_cq req = { .cq_handle = cq, .ne = 1 };
	struct {
		struct ib_uverbs_poll_cq_resp h;
		struct ib_uverbs_wc wc;
	} resp;
	int i;

	for (i = 0; i < 100000; i++) {
		must(cmd(IB_USER_VERBS_CMD_POLL_CQ, &req, sizeof(req), &resp, sizeof(resp)), "POLL_CQ");
		if (resp.h.count == 1) {
			printf("C wr_id=%llu status=%u opcode=%u byte_len=%u qp_num=0x%x wc_flags=0x%x imm=0x%x\n",
			       (unsigned long long)resp.wc.wr_id, resp.wc.status, resp.wc.opcode,
			       resp.wc.byte_len, resp.wc.qp_num, resp.wc.wc_flags,
			       __builtin_bswap32(resp.wc.ex.imm_data));
			return resp.wc;
		}
		if (resp.h.count)
			fail("POLL_CQ count %u", resp.h.count);
		usleep(100);
	}
	fail("no completion within 10 s");
	return resp.wc;
}

/*
 * The sender's and the receiver's completion share a CQ and come in either
 * order (an RC send completes when it is acknowledged): poll both and put
 * the lower wr_id (the sender's, by convention here) first.
 */
static void poll_two(uint32_t cq, struct ib_uverbs_wc *first, struct ib_uverbs_wc *second)
{
	struct ib_uverbs_wc a = poll_one(cq), b = poll_one(cq);

	*first = a.wr_id < b.wr_id ? a : b;
	*second = a.wr_id < b.wr_id ? b : a;
}

static void expect_wc(struct ib_uverbs_wc wc, uint64_t wr_id, uint32_t opcode, uint32_t len)
{
	if (wc.wr_id != wr_id)
		fail("completion wr_id %llu, expected %llu", (unsigned long long)wc.wr_id,
		     (unsigned long long)wr_id);
	if (wc.status || wc.wr_id != wr_id || wc.opcode != opcode || wc.byte_len != len)
		fail("completion wr_id %llu status %u opcode %u len %u, expected wr_id %llu opcode %u len %u",
		     (unsigned long long)wc.wr_id, wc.status, wc.opcode, wc.byte_len,
		     (unsigned long long)wr_id, opcode, len);
}

static int do_info(void)
{
	struct ib_uverbs_query_device_resp d;
	struct ib_uverbs_query_port_resp p;

	open_dev();
	query(&d, &p);
	printf("D fw_ver=%llu vendor_id=0x%x vendor_part_id=0x%x hw_ver=%u phys_port_cnt=%u\n",
	       (unsigned long long)d.fw_ver, d.vendor_id, d.vendor_part_id, d.hw_ver, d.phys_port_cnt);
	printf("D max_qp=%u max_qp_wr=%u max_sge=%u max_cq=%u max_cqe=%u max_mr=%u max_pd=%u max_ah=%u\n",
	       d.max_qp, d.max_qp_wr, d.max_sge, d.max_cq, d.max_cqe, d.max_mr, d.max_pd, d.max_ah);
	printf("D max_qp_rd_atom=%u max_qp_init_rd_atom=%u max_mr_size=%llu page_size_cap=%llu atomic_cap=%u max_pkeys=%u\n",
	       d.max_qp_rd_atom, d.max_qp_init_rd_atom, (unsigned long long)d.max_mr_size,
	       (unsigned long long)d.page_size_cap, d.atomic_cap, d.max_pkeys);
	printf("P state=%u max_mtu=%u active_mtu=%u gid_tbl_len=%u pkey_tbl_len=%u link_layer=%u flags=0x%x lid=%u\n",
	       p.state, p.max_mtu, p.active_mtu, p.gid_tbl_len, p.pkey_tbl_len, p.link_layer,
	       p.flags, p.lid);
	return 0;
}

static int do_rc(void)
{
	const uint32_t acc = 1 | 2 | 4; /* LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ */
	struct ib_uverbs_create_qp_resp a, b;
	struct ib_uverbs_reg_mr_resp mr;
	struct ib_uverbs_send_wr wr;
	struct ib_uverbs_wc w1, w2;
	struct ib_uverbs_sge sge;
	uint32_t pd, cq;
	/* three pages, not page-aligned at the start: a page list of 4 */
	size_t len = 3 * 4096;
	char *mem = mmap(NULL, 5 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *buf = mem + 100, *src = buf, *dst = buf + 6000;
	static const char inl[] = "inline hello";
	int rc;

	if (mem == MAP_FAILED)
		fail("mmap");
	open_dev();
	read_gid0();
	pd = alloc_pd();
	cq = create_cq(16);
	mr = reg_mr(pd, buf, len, acc);
	printf("M lkey=0x%x rkey=0x%x\n", mr.lkey, mr.rkey);
	a = create_qp(pd, cq, 2);
	b = create_qp(pd, cq, 2);
	connect_rc(a.qp_handle, b.qpn, acc);
	connect_rc(b.qp_handle, a.qpn, acc);

	/* SEND a -> b */
	strcpy(src, "hello through virtio-rdma");
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)dst, .length = 100, .lkey = mr.lkey };
	post_recv(b.qp_handle, 11, &sge);
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)src, .length = 26, .lkey = mr.lkey };
	wr = (struct ib_uverbs_send_wr){ .wr_id = 1, .num_sge = 1, .opcode = IB_UVERBS_WR_SEND,
					 .send_flags = SEND_SIGNALED };
	must(post_send(a.qp_handle, &wr, &sge), "POST_SEND send");
	poll_two(cq, &w1, &w2);
	expect_wc(w1, 1, IB_UVERBS_WC_SEND, 26);
	expect_wc(w2, 11, WC_RECV, 26);
	if (strcmp(dst, src))
		fail("SEND data: '%s'", dst);

	/* inline SEND: the data comes from this process, copied by the driver */
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)dst, .length = 100, .lkey = mr.lkey };
	post_recv(b.qp_handle, 12, &sge);
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)inl, .length = sizeof(inl), .lkey = 0 };
	wr = (struct ib_uverbs_send_wr){ .wr_id = 2, .num_sge = 1, .opcode = IB_UVERBS_WR_SEND,
					 .send_flags = SEND_SIGNALED | SEND_INLINE };
	must(post_send(a.qp_handle, &wr, &sge), "POST_SEND inline");
	poll_two(cq, &w1, &w2);
	expect_wc(w1, 2, IB_UVERBS_WC_SEND, sizeof(inl));
	expect_wc(w2, 12, WC_RECV, sizeof(inl));
	if (strcmp(dst, inl))
		fail("inline data: '%s'", dst);

	/* RDMA WRITE with immediate across the page boundaries */
	memset(dst, 0, 5000);
	memset(src, 'w', 5000);
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)dst, .length = 0, .lkey = mr.lkey };
	post_recv(b.qp_handle, 13, &sge);
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)src, .length = 5000, .lkey = mr.lkey };
	wr = (struct ib_uverbs_send_wr){ .wr_id = 3, .num_sge = 1, .opcode = IB_UVERBS_WR_RDMA_WRITE_WITH_IMM,
					 .send_flags = SEND_SIGNALED };
	wr.ex.imm_data = __builtin_bswap32(0x1234abcd);
	wr.wr.rdma.remote_addr = (uintptr_t)dst;
	wr.wr.rdma.rkey = mr.rkey;
	must(post_send(a.qp_handle, &wr, &sge), "POST_SEND write");
	poll_two(cq, &w1, &w2);
	expect_wc(w1, 3, IB_UVERBS_WC_RDMA_WRITE, 5000);
	expect_wc(w2, 13, WC_RECV_RDMA_WITH_IMM, 5000);
	if (!(w2.wc_flags & WC_FLAG_WITH_IMM) || __builtin_bswap32(w2.ex.imm_data) != 0x1234abcd)
		fail("immediate 0x%x flags 0x%x", __builtin_bswap32(w2.ex.imm_data), w2.wc_flags);
	if (memcmp(dst, src, 5000))
		fail("RDMA WRITE data differs");

	/* RDMA READ back into the first bytes */
	memset(src, 0, 64);
	strcpy(dst, "read me back");
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)src, .length = 13, .lkey = mr.lkey };
	wr = (struct ib_uverbs_send_wr){ .wr_id = 4, .num_sge = 1, .opcode = IB_UVERBS_WR_RDMA_READ,
					 .send_flags = SEND_SIGNALED };
	wr.wr.rdma.remote_addr = (uintptr_t)dst;
	wr.wr.rdma.rkey = mr.rkey;
	must(post_send(a.qp_handle, &wr, &sge), "POST_SEND read");
	expect_wc(poll_one(cq), 4, IB_UVERBS_WC_RDMA_READ, 13);
	if (strcmp(src, "read me back"))
		fail("RDMA READ data: '%s'", src);

	/* an MR of 768 pages needs the two-level page list */
	{
		size_t big_len = 768 * 4096;
		char *big = mmap(NULL, big_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct ib_uverbs_reg_mr_resp bmr;

		if (big == MAP_FAILED)
			fail("mmap big");
		memset(big, 0, big_len);
		bmr = reg_mr(pd, big, big_len, acc);
		memset(src, 'b', 3000);
		sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)src, .length = 3000, .lkey = mr.lkey };
		wr = (struct ib_uverbs_send_wr){ .wr_id = 6, .num_sge = 1, .opcode = IB_UVERBS_WR_RDMA_WRITE,
						 .send_flags = SEND_SIGNALED };
		/* straddles pages 700 and 701, both behind the second level-2 array */
		wr.wr.rdma.remote_addr = (uintptr_t)big + 701 * 4096 - 1000;
		wr.wr.rdma.rkey = bmr.rkey;
		must(post_send(a.qp_handle, &wr, &sge), "POST_SEND big write");
		expect_wc(poll_one(cq), 6, IB_UVERBS_WC_RDMA_WRITE, 3000);
		if (memcmp(big + 701 * 4096 - 1000, src, 3000) || big[701 * 4096 - 1001] || big[701 * 4096 + 2000])
			fail("RDMA WRITE into the 768-page MR landed elsewhere");
		printf("B big_mr_pages=768 ok\n");
	}

	/* the driver refuses what the QP cannot do before the device sees it */
	wr = (struct ib_uverbs_send_wr){ .wr_id = 5, .num_sge = 1, .opcode = IB_UVERBS_WR_SEND,
					 .send_flags = SEND_INLINE };
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)src, .length = 4096, .lkey = 0 };
	rc = post_send(a.qp_handle, &wr, &sge);
	printf("E inline_too_long=%d\n", rc);
	if (rc != -EINVAL)
		fail("inline beyond max_inline_data: %d", rc);
	printf("OK rc\n");
	return 0;
}

static int do_ud(void)
{
	struct ib_uverbs_create_qp_resp a, b;
	struct ib_uverbs_reg_mr_resp mr;
	struct ib_uverbs_create_ah ah = {};
	struct ib_uverbs_create_ah_resp ahr;
	struct ib_uverbs_modify_qp m = {};
	struct ib_uverbs_send_wr wr;
	struct ib_uverbs_wc w1, w2;
	struct ib_uverbs_sge sge;
	uint32_t pd, cq, qps[2];
	char *buf = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int i;

	open_dev();
	read_gid0();
	pd = alloc_pd();
	cq = create_cq(8);
	mr = reg_mr(pd, buf, 8192, 1);
	a = create_qp(pd, cq, 4);
	b = create_qp(pd, cq, 4);
	qps[0] = a.qp_handle;
	qps[1] = b.qp_handle;
	for (i = 0; i < 2; i++) {
		memset(&m, 0, sizeof(m));
		m.qp_state = 1;
		m.port_num = 1;
		m.qkey = 0x11111111;
		modify(qps[i], 1 | 16 | 32 | 64, &m, "UD RESET->INIT");
		m.qp_state = 2;
		modify(qps[i], 1, &m, "UD INIT->RTR");
		m.qp_state = 3;
		m.sq_psn = 7;
		modify(qps[i], 1 | (1 << 16), &m, "UD RTR->RTS");
	}
	ah.pd_handle = pd;
	memcpy(ah.attr.grh.dgid, gid0, 16);
	ah.attr.grh.hop_limit = 64;
	ah.attr.is_global = 1;
	ah.attr.port_num = 1;
	must(CMD(CREATE_AH, ah, &ahr), "CREATE_AH");

	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)buf + 4096, .length = 40 + 64, .lkey = mr.lkey };
	post_recv(b.qp_handle, 21, &sge);
	strcpy(buf, "datagram");
	sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)buf, .length = 9, .lkey = mr.lkey };
	wr = (struct ib_uverbs_send_wr){ .wr_id = 20, .num_sge = 1, .opcode = IB_UVERBS_WR_SEND,
					 .send_flags = SEND_SIGNALED };
	wr.wr.ud.ah = ahr.ah_handle;
	wr.wr.ud.remote_qpn = b.qpn;
	wr.wr.ud.remote_qkey = 0x11111111;
	must(post_send(a.qp_handle, &wr, &sge), "POST_SEND ud");
	poll_two(cq, &w1, &w2);
	expect_wc(w1, 20, IB_UVERBS_WC_SEND, 9);
	expect_wc(w2, 21, WC_RECV, 40 + 9);
	if (!(w2.wc_flags & WC_FLAG_GRH) || w2.src_qp != a.qpn)
		fail("UD receive flags 0x%x src_qp 0x%x", w2.wc_flags, w2.src_qp);
	if (strcmp(buf + 4096 + 40, "datagram"))
		fail("UD data: '%s'", buf + 4096 + 40);
	printf("OK ud\n");
	return 0;
}

static uint32_t create_cq_channel(uint32_t cqe, int *chan)
{
	struct ib_uverbs_create_comp_channel cc = {};
	struct ib_uverbs_create_comp_channel_resp ccr;
	struct ib_uverbs_create_cq req = { .cqe = cqe };
	struct ib_uverbs_create_cq_resp resp;

	must(CMD(CREATE_COMP_CHANNEL, cc, &ccr), "CREATE_COMP_CHANNEL");
	*chan = ccr.fd;
	req.comp_channel = ccr.fd;
	must(CMD(CREATE_CQ, req, &resp), "CREATE_CQ (channel)");
	return resp.cq_handle;
}

static void arm(uint32_t cq, uint32_t solicited_only)
{
	struct ib_uverbs_req_notify_cq req = { .cq_handle = cq, .solicited_only = solicited_only };

	must(cmd(IB_USER_VERBS_CMD_REQ_NOTIFY_CQ, &req, sizeof(req), NULL, 0), "REQ_NOTIFY_CQ");
}

/* one completion event from the channel within 10 s, or fail */
static void wait_event(int chan, uint32_t cq_handle)
{
	struct ib_uverbs_comp_event_desc ev;
	struct timeval tv = { .tv_sec = 10 };
	fd_set rd;

	FD_ZERO(&rd);
	FD_SET(chan, &rd);
	if (select(chan + 1, &rd, NULL, NULL, &tv) != 1)
		fail("no completion event within 10 s");
	if (read(chan, &ev, sizeof(ev)) != sizeof(ev))
		fail("reading the completion event: %s", strerror(errno));
	printf("V event cq_handle=%llu\n", (unsigned long long)ev.cq_handle);
}

/* no event may be pending on the channel now */
static void expect_no_event(int chan, int ms)
{
	struct timeval tv = { .tv_sec = 0, .tv_usec = ms * 1000 };
	fd_set rd;

	FD_ZERO(&rd);
	FD_SET(chan, &rd);
	if (select(chan + 1, &rd, NULL, NULL, &tv) != 0)
		fail("completion event while the CQ was not armed");
}

static int do_notify(void)
{
	const uint32_t acc = 1;
	struct ib_uverbs_create_qp_resp a, b;
	struct ib_uverbs_reg_mr_resp mr;
	struct ib_uverbs_send_wr wr;
	struct ib_uverbs_wc w1, w2;
	struct ib_uverbs_sge sge;
	char *buf = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t pd, cq;
	int chan, round;

	open_dev();
	read_gid0();
	pd = alloc_pd();
	cq = create_cq_channel(16, &chan);
	mr = reg_mr(pd, buf, 8192, acc);
	a = create_qp(pd, cq, 2);
	b = create_qp(pd, cq, 2);
	connect_rc(a.qp_handle, b.qpn, acc);
	connect_rc(b.qp_handle, a.qpn, acc);

	for (round = 0; round < 3; round++) {
		sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)buf + 4096, .length = 64, .lkey = mr.lkey };
		post_recv(b.qp_handle, 100 + round, &sge);
		if (round == 2) {
			/* unarmed: completions arrive, no event does */
			expect_no_event(chan, 0);
		} else {
			arm(cq, 0);
		}
		sge = (struct ib_uverbs_sge){ .addr = (uintptr_t)buf, .length = 8, .lkey = mr.lkey };
		wr = (struct ib_uverbs_send_wr){ .wr_id = 1 + round, .num_sge = 1, .opcode = IB_UVERBS_WR_SEND,
						 .send_flags = SEND_SIGNALED };
		must(post_send(a.qp_handle, &wr, &sge), "POST_SEND");
		if (round < 2)
			wait_event(chan, cq);
		poll_two(cq, &w1, &w2);
		expect_wc(w1, 1 + round, IB_UVERBS_WC_SEND, 8);
		expect_wc(w2, 100 + round, WC_RECV, 8);
	}
	expect_no_event(chan, 300);
	printf("OK notify\n");
	return 0;
}

static int do_hold(void)
{
	struct ib_uverbs_query_device qd = {};
	struct ib_uverbs_query_device_resp d;
	char *buf = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct stat st;
	uint32_t pd, cq;
	int rc;

	open_dev();
	pd = alloc_pd();
	cq = create_cq(8);
	reg_mr(pd, buf, 8192, 1);
	create_qp(pd, cq, 2);
	printf("READY\n");
	fflush(stdout);
	while (stat("/tmp/go", &st))
		usleep(10000);
	rc = CMD(QUERY_DEVICE, qd, &d);
	printf("AFTER query_device=%d\n", rc);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "info"))
		return do_info();
	if (argc == 2 && !strcmp(argv[1], "rc"))
		return do_rc();
	if (argc == 2 && !strcmp(argv[1], "ud"))
		return do_ud();
	if (argc == 2 && !strcmp(argv[1], "notify"))
		return do_notify();
	if (argc == 2 && !strcmp(argv[1], "hold"))
		return do_hold();
	fprintf(stderr, "usage: %s info|rc|ud|notify|hold\n", argv[0]);
	return 2;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * vrdma_kselftest: exercises a virtio_rdma device the way an in-kernel
 * RDMA consumer does, from module init: ib_alloc_pd (which takes the
 * driver's DMA MR), ib_alloc_cq with IB_POLL_SOFTIRQ (so the CQ is re-armed
 * from softirq context), two RC QPs on the device's GID, SEND/RECV from
 * DMA-mapped buffers and an inline SEND from kernel memory, completions
 * through wr_cqe callbacks. Loading fails (-EIO) if anything is off; each
 * step prints one "vrdma_kselftest:" line.
 *
 *   insmod vrdma_kselftest.ko [dev=virtio_rdma0]
 */
#include <linux/completion.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <rdma/ib_cache.h>
#include <rdma/ib_verbs.h>

static char *dev_name_param = "virtio_rdma0";
module_param_named(dev, dev_name_param, charp, 0444);
MODULE_PARM_DESC(dev, "RDMA device to test (default virtio_rdma0)");

#define KST_LEN		256
#define KST_ROUNDS	50

struct kst_wait {
	struct ib_cqe cqe;
	struct completion done;
	struct ib_wc wc;
};

struct kst {
	struct ib_device *dev;
	struct ib_pd *pd;
	struct ib_cq *cq;
	struct ib_qp *qp[2];
	void *buf[2];
	u64 dma[2];
	union ib_gid gid;
};

static void kst_done(struct ib_cq *cq, struct ib_wc *wc)
{
	struct kst_wait *w = container_of(wc->wr_cqe, struct kst_wait, cqe);

	w->wc = *wc;
	complete(&w->done);
}

static void kst_wait_init(struct kst_wait *w)
{
	w->cqe.done = kst_done;
	init_completion(&w->done);
}

static int kst_wait(struct kst_wait *w, const char *what)
{
	if (!wait_for_completion_timeout(&w->done, 10 * HZ)) {
		pr_err("vrdma_kselftest: %s: no completion within 10 s\n", what);
		return -ETIMEDOUT;
	}
	if (w->wc.status != IB_WC_SUCCESS) {
		pr_err("vrdma_kselftest: %s: status %s\n", what, ib_wc_status_msg(w->wc.status));
		return -EIO;
	}
	return 0;
}

static int kst_connect(struct kst *t, struct ib_qp *qp, u32 dest_qpn)
{
	struct ib_qp_attr a = {};
	int err;

	a.qp_state = IB_QPS_INIT;
	a.pkey_index = 0;
	a.port_num = 1;
	a.qp_access_flags = IB_ACCESS_LOCAL_WRITE;
	err = ib_modify_qp(qp, &a, IB_QP_STATE | IB_QP_PKEY_INDEX | IB_QP_PORT | IB_QP_ACCESS_FLAGS);
	if (err)
		return err;

	memset(&a, 0, sizeof(a));
	a.qp_state = IB_QPS_RTR;
	a.path_mtu = IB_MTU_1024;
	a.dest_qp_num = dest_qpn;
	a.rq_psn = 1;
	a.max_dest_rd_atomic = 1;
	a.min_rnr_timer = 1;
	a.ah_attr.type = rdma_ah_find_type(t->dev, 1);
	rdma_ah_set_port_num(&a.ah_attr, 1);
	rdma_ah_set_grh(&a.ah_attr, &t->gid, 0, 0, 64, 0);
	err = ib_modify_qp(qp, &a, IB_QP_STATE | IB_QP_AV | IB_QP_PATH_MTU | IB_QP_DEST_QPN |
			   IB_QP_RQ_PSN | IB_QP_MAX_DEST_RD_ATOMIC | IB_QP_MIN_RNR_TIMER);
	if (err)
		return err;

	memset(&a, 0, sizeof(a));
	a.qp_state = IB_QPS_RTS;
	a.sq_psn = 1;
	a.timeout = 14;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.max_rd_atomic = 1;
	return ib_modify_qp(qp, &a, IB_QP_STATE | IB_QP_SQ_PSN | IB_QP_TIMEOUT | IB_QP_RETRY_CNT |
			    IB_QP_RNR_RETRY | IB_QP_MAX_QP_RD_ATOMIC);
}

/* one SEND from qp[0] to qp[1]: from buf[0] through the DMA MR, or inline */
static int kst_send(struct kst *t, int round, bool inl)
{
	struct kst_wait sw, rw;
	struct ib_sge ssge, rsge;
	struct ib_recv_wr rwr = {};
	struct ib_send_wr swr = {};
	char text[32];
	int len, err;

	kst_wait_init(&sw);
	kst_wait_init(&rw);
	len = scnprintf(text, sizeof(text), "kernel %s %d", inl ? "inline" : "send", round) + 1;
	memset(t->buf[1], 0, KST_LEN);
	ib_dma_sync_single_for_device(t->dev, t->dma[1], KST_LEN, DMA_FROM_DEVICE);

	rsge = (struct ib_sge){ .addr = t->dma[1], .length = KST_LEN, .lkey = t->pd->local_dma_lkey };
	rwr.wr_cqe = &rw.cqe;
	rwr.sg_list = &rsge;
	rwr.num_sge = 1;
	err = ib_post_recv(t->qp[1], &rwr, NULL);
	if (err)
		return err;

	if (inl) {
		ssge = (struct ib_sge){ .addr = (uintptr_t)text, .length = len };
	} else {
		memcpy(t->buf[0], text, len);
		ib_dma_sync_single_for_device(t->dev, t->dma[0], KST_LEN, DMA_TO_DEVICE);
		ssge = (struct ib_sge){ .addr = t->dma[0], .length = len, .lkey = t->pd->local_dma_lkey };
	}
	swr.wr_cqe = &sw.cqe;
	swr.sg_list = &ssge;
	swr.num_sge = 1;
	swr.opcode = IB_WR_SEND;
	swr.send_flags = IB_SEND_SIGNALED | (inl ? IB_SEND_INLINE : 0);
	err = ib_post_send(t->qp[0], &swr, NULL);
	if (err)
		return err;

	err = kst_wait(&sw, "send");
	if (!err)
		err = kst_wait(&rw, "recv");
	if (err)
		return err;
	ib_dma_sync_single_for_cpu(t->dev, t->dma[1], KST_LEN, DMA_FROM_DEVICE);
	if (rw.wc.byte_len != len || rw.wc.opcode != IB_WC_RECV || strcmp(t->buf[1], text)) {
		pr_err("vrdma_kselftest: round %d: received %u bytes '%.32s', expected %d '%s'\n",
		       round, rw.wc.byte_len, (char *)t->buf[1], len, text);
		return -EIO;
	}
	return 0;
}

static void kst_teardown(struct kst *t)
{
	int i;

	for (i = 0; i < 2; i++) {
		if (!IS_ERR_OR_NULL(t->qp[i]))
			ib_destroy_qp(t->qp[i]);
	}
	if (!IS_ERR_OR_NULL(t->cq))
		ib_free_cq(t->cq);
	for (i = 0; i < 2; i++) {
		if (t->dma[i])
			ib_dma_unmap_single(t->dev, t->dma[i], KST_LEN, DMA_BIDIRECTIONAL);
		kfree(t->buf[i]);
	}
	if (!IS_ERR_OR_NULL(t->pd))
		ib_dealloc_pd(t->pd);
}

static int kst_run(struct kst *t)
{
	struct ib_qp_init_attr init = {};
	int i, err;

	err = rdma_query_gid(t->dev, 1, 0, &t->gid);
	if (err)
		return err;
	t->pd = ib_alloc_pd(t->dev, 0);
	if (IS_ERR(t->pd))
		return PTR_ERR(t->pd);
	pr_info("vrdma_kselftest: pd with local_dma_lkey 0x%x\n", t->pd->local_dma_lkey);
	t->cq = ib_alloc_cq(t->dev, NULL, 16, 0, IB_POLL_SOFTIRQ);
	if (IS_ERR(t->cq))
		return PTR_ERR(t->cq);

	init.send_cq = t->cq;
	init.recv_cq = t->cq;
	init.qp_type = IB_QPT_RC;
	init.sq_sig_type = IB_SIGNAL_REQ_WR;
	init.cap.max_send_wr = 4;
	init.cap.max_recv_wr = 4;
	init.cap.max_send_sge = 1;
	init.cap.max_recv_sge = 1;
	init.cap.max_inline_data = 32;
	for (i = 0; i < 2; i++) {
		t->qp[i] = ib_create_qp(t->pd, &init);
		if (IS_ERR(t->qp[i]))
			return PTR_ERR(t->qp[i]);
		t->buf[i] = kzalloc(KST_LEN, GFP_KERNEL);
		if (!t->buf[i])
			return -ENOMEM;
		t->dma[i] = ib_dma_map_single(t->dev, t->buf[i], KST_LEN, DMA_BIDIRECTIONAL);
		if (ib_dma_mapping_error(t->dev, t->dma[i])) {
			t->dma[i] = 0;
			return -ENOMEM;
		}
	}
	err = kst_connect(t, t->qp[0], t->qp[1]->qp_num);
	if (!err)
		err = kst_connect(t, t->qp[1], t->qp[0]->qp_num);
	if (err)
		return err;
	pr_info("vrdma_kselftest: qpn 0x%x <-> 0x%x connected (RTS)\n",
		t->qp[0]->qp_num, t->qp[1]->qp_num);

	for (i = 0; i < KST_ROUNDS; i++) {
		err = kst_send(t, i, i % 2);
		if (err) {
			pr_err("vrdma_kselftest: round %d failed: %d\n", i, err);
			return err;
		}
	}
	pr_info("vrdma_kselftest: %d SENDs (half inline) received intact\n", KST_ROUNDS);
	return 0;
}

static int __init kst_init(void)
{
	struct kst t = {};
	int err;

	t.dev = ib_device_get_by_name(dev_name_param, RDMA_DRIVER_UNKNOWN);
	if (!t.dev) {
		pr_err("vrdma_kselftest: no RDMA device %s\n", dev_name_param);
		return -ENODEV;
	}
	err = kst_run(&t);
	kst_teardown(&t);
	ib_device_put(t.dev);
	if (err) {
		pr_err("vrdma_kselftest: FAILED (%d)\n", err);
		return -EIO;
	}
	pr_info("vrdma_kselftest: PASSED\n");
	return 0;
}

static void __exit kst_exit(void)
{
}

module_init(kst_init);
module_exit(kst_exit);
MODULE_DESCRIPTION("in-kernel consumer test for virtio_rdma");
MODULE_LICENSE("GPL");

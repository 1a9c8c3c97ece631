// SPDX-License-Identifier: GPL-2.0
/*
 * Queue pairs: each QP owns the SQ/RQ virtqueue pair of the slot the
 * device gave it. A WQE is one device-readable buffer (header, then SGEs
 * or inline data); the device hands the chain back once the WR is done,
 * and we reclaim it the next time something is posted.
 */
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/virtio_config.h>
#include <rdma/ib_user_verbs.h>

#include "virtio_rdma.h"

#define VRDMA_QP_ATTR_MASK	(BIT(21) - 1)	/* IB_QP_STATE .. IB_QP_DEST_QPN */
#define VRDMA_SEND_FLAGS	(IB_SEND_FENCE | IB_SEND_SIGNALED | IB_SEND_SOLICITED | \
				 IB_SEND_INLINE)

struct vrdma_qp *vrdma_qp_lookup(struct vrdma_dev *dev, u32 qpn)
{
	return xa_load(&dev->qps, qpn);
}

static void vrdma_wq_free(struct vrdma_wq *wq)
{
	unsigned int i;

	if (wq->bufs)
		for (i = 0; i < wq->nbufs; i++)
			kfree(wq->bufs[i]);
	kfree(wq->bufs);
	bitmap_free(wq->busy);
	wq->bufs = NULL;
	wq->busy = NULL;
}

static int vrdma_wq_init(struct vrdma_wq *wq, struct virtqueue *vq,
			 unsigned int nbufs, size_t buf_size)
{
	unsigned int i;

	spin_lock_init(&wq->lock);
	wq->vq = vq;
	wq->nbufs = nbufs;
	wq->buf_size = buf_size;
	wq->bufs = kcalloc(nbufs, sizeof(*wq->bufs), GFP_KERNEL);
	wq->busy = bitmap_zalloc(nbufs, GFP_KERNEL);
	if (!wq->bufs || !wq->busy)
		goto nomem;
	for (i = 0; i < nbufs; i++) {
		wq->bufs[i] = kmalloc(buf_size, GFP_KERNEL);
		if (!wq->bufs[i])
			goto nomem;
	}
	return 0;
nomem:
	vrdma_wq_free(wq);
	return -ENOMEM;
}

/* wq->lock held: take back the chains the device returned */
static void vrdma_wq_reclaim(struct vrdma_wq *wq)
{
	unsigned int len;
	void **token;

	while ((token = virtqueue_get_buf(wq->vq, &len)) != NULL) {
		if (WARN_ON_ONCE(token < wq->bufs || token >= wq->bufs + wq->nbufs))
			continue;
		clear_bit(token - wq->bufs, wq->busy);
	}
}

/* wq->lock held: queue buffer idx (len bytes) on the ring */
static int vrdma_wq_add(struct vrdma_wq *wq, unsigned int idx, size_t len)
{
	struct scatterlist sg;

	sg_init_one(&sg, wq->bufs[idx], len);
	return virtqueue_add_outbuf(wq->vq, &sg, 1, &wq->bufs[idx], GFP_ATOMIC);
}

/* wq->lock held: a free buffer, or -ENOMEM when max_*_wr are outstanding */
static int vrdma_wq_get(struct vrdma_wq *wq)
{
	unsigned int idx = find_first_zero_bit(wq->busy, wq->nbufs);

	if (idx >= wq->nbufs) {
		vrdma_wq_reclaim(wq);
		idx = find_first_zero_bit(wq->busy, wq->nbufs);
		if (idx >= wq->nbufs)
			return -ENOMEM;
	}
	set_bit(idx, wq->busy);
	return idx;
}

/*
 * After DESTROY_QP or MODIFY_QP to RESET the device has returned every
 * chain of the QP. If it kept one it may still read it: the slot is
 * retired and its buffers are never freed.
 */
static bool vrdma_qp_reclaim_all(struct vrdma_dev *dev, struct vrdma_qp *qp)
{
	struct vrdma_wq *wqs[2] = { &qp->sq, &qp->rq };
	unsigned long flags;
	bool empty = true;
	int i;

	for (i = 0; i < 2; i++) {
		spin_lock_irqsave(&wqs[i]->lock, flags);
		vrdma_wq_reclaim(wqs[i]);
		if (!bitmap_empty(wqs[i]->busy, wqs[i]->nbufs))
			empty = false;
		spin_unlock_irqrestore(&wqs[i]->lock, flags);
	}
	if (!empty) {
		dev_err(&dev->vdev->dev, "qpn 0x%x: device kept WQEs; retiring QP slot %u\n",
			qp->qpn, qp->slot);
		spin_lock_irqsave(&dev->slot_lock, flags);
		set_bit(qp->slot, dev->qp_slot_poisoned);
		spin_unlock_irqrestore(&dev->slot_lock, flags);
	}
	return empty;
}

static u8 vrdma_qp_type(enum ib_qp_type t)
{
	switch (t) {
	case IB_QPT_RC:
		return VRDMA_QPT_RC;
	case IB_QPT_UC:
		return VRDMA_QPT_UC;
	case IB_QPT_UD:
		return VRDMA_QPT_UD;
	default:
		return 0;
	}
}

static int vrdma_qp_check_resp(struct vrdma_dev *dev, struct vrdma_qp *qp,
			       const struct ib_qp_cap *want,
			       const struct vrdma_create_qp_resp *r,
			       struct ib_qp_cap *got)
{
	unsigned long flags;
	int err = 0;

	got->max_send_wr = le32_to_cpu(r->max_send_wr);
	got->max_recv_wr = le32_to_cpu(r->max_recv_wr);
	got->max_send_sge = le32_to_cpu(r->max_send_sge);
	got->max_recv_sge = le32_to_cpu(r->max_recv_sge);
	got->max_inline_data = le32_to_cpu(r->max_inline_data);
	if (!qp->qpn || qp->qpn > 0xffffff || qp->slot >= dev->num_qp_slots ||
	    got->max_send_wr < want->max_send_wr || got->max_send_wr > dev->attrs.max_qp_wr ||
	    got->max_recv_wr < want->max_recv_wr || got->max_recv_wr > dev->attrs.max_qp_wr ||
	    got->max_send_sge < want->max_send_sge || got->max_send_sge > dev->attrs.max_send_sge ||
	    got->max_recv_sge < want->max_recv_sge || got->max_recv_sge > dev->attrs.max_recv_sge ||
	    got->max_inline_data < want->max_inline_data ||
	    got->max_inline_data > dev->max_inline_data)
		return -EPROTO;
	/* claimed at once, so a device handing out one slot twice is caught */
	spin_lock_irqsave(&dev->slot_lock, flags);
	if (dev->qp_of_slot[qp->slot] || test_bit(qp->slot, dev->qp_slot_poisoned))
		err = -EPROTO;
	else
		dev->qp_of_slot[qp->slot] = qp;
	spin_unlock_irqrestore(&dev->slot_lock, flags);
	return err;
}

static void vrdma_qp_release_slot(struct vrdma_dev *dev, struct vrdma_qp *qp)
{
	unsigned long flags;

	spin_lock_irqsave(&dev->slot_lock, flags);
	dev->qp_of_slot[qp->slot] = NULL;
	spin_unlock_irqrestore(&dev->slot_lock, flags);
}

int vrdma_create_qp(struct ib_qp *ibqp, struct ib_qp_init_attr *init,
		    struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_create_qp req = {};
	struct vrdma_create_qp_resp r;
	struct ib_qp_cap want = init->cap, got;
	size_t send_size;
	int err;

	qp->type = vrdma_qp_type(init->qp_type);
	if (!qp->type || init->srq || init->create_flags)
		return -EOPNOTSUPP;
	/* the device wants room for at least one WQE on each queue */
	want.max_send_wr = max(want.max_send_wr, 1U);
	want.max_recv_wr = max(want.max_recv_wr, 1U);
	if (want.max_send_wr > dev->attrs.max_qp_wr || want.max_recv_wr > dev->attrs.max_qp_wr ||
	    want.max_send_sge > dev->attrs.max_send_sge ||
	    want.max_recv_sge > dev->attrs.max_recv_sge ||
	    want.max_inline_data > dev->max_inline_data)
		return -EINVAL;

	req.pdn = cpu_to_le32(to_vpd(ibqp->pd)->pdn);
	req.qp_type = qp->type;
	req.sq_sig_all = init->sq_sig_type == IB_SIGNAL_ALL_WR;
	req.send_cqn = cpu_to_le32(to_vcq(init->send_cq)->cqn);
	req.recv_cqn = cpu_to_le32(to_vcq(init->recv_cq)->cqn);
	req.max_send_wr = cpu_to_le32(want.max_send_wr);
	req.max_recv_wr = cpu_to_le32(want.max_recv_wr);
	req.max_send_sge = cpu_to_le32(want.max_send_sge);
	req.max_recv_sge = cpu_to_le32(want.max_recv_sge);
	req.max_inline_data = cpu_to_le32(want.max_inline_data);
	err = vrdma_exec(dev, VRDMA_CMD_CREATE_QP, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	qp->qpn = le32_to_cpu(r.qpn);
	qp->slot = le32_to_cpu(r.slot);
	if (vrdma_qp_check_resp(dev, qp, &want, &r, &got)) {
		dev_err(&dev->vdev->dev, "CREATE_QP: impossible answer (qpn 0x%x, slot %u, wr %u/%u, sge %u/%u, inline %u)\n",
			qp->qpn, qp->slot, got.max_send_wr, got.max_recv_wr,
			got.max_send_sge, got.max_recv_sge, got.max_inline_data);
		vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_QP, qp->qpn, true);
		return -EPROTO;
	}
	qp->user = !!udata;
	qp->sq_sig_all = req.sq_sig_all;
	qp->state = IB_QPS_RESET;
	qp->max_send_sge = got.max_send_sge;
	qp->max_recv_sge = got.max_recv_sge;
	qp->max_inline_data = got.max_inline_data;

	send_size = sizeof(struct vrdma_send_wqe) +
		    max_t(size_t, got.max_send_sge * sizeof(struct vrdma_sge), got.max_inline_data);
	err = vrdma_wq_init(&qp->sq, dev->vqs[vrdma_sq_vq(dev, qp->slot)],
			    got.max_send_wr, send_size);
	if (err)
		goto err_destroy;
	err = vrdma_wq_init(&qp->rq, dev->vqs[vrdma_sq_vq(dev, qp->slot) + 1], got.max_recv_wr,
			    sizeof(struct vrdma_recv_wqe) + got.max_recv_sge * sizeof(struct vrdma_sge));
	if (err)
		goto err_free_sq;

	err = xa_insert_irq(&dev->qps, qp->qpn, qp, GFP_KERNEL);
	if (err) {
		dev_err(&dev->vdev->dev, "CREATE_QP: qpn 0x%x is already in use\n", qp->qpn);
		err = -EPROTO;
		goto err_free_rq;
	}
	ibqp->qp_num = qp->qpn;
	init->cap = got;
	return 0;

err_free_rq:
	vrdma_wq_free(&qp->rq);
err_free_sq:
	vrdma_wq_free(&qp->sq);
err_destroy:
	/* nothing was posted yet: the rings hold nothing of this QP */
	vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_QP, qp->qpn, true);
	vrdma_qp_release_slot(dev, qp);
	return err;
}

int vrdma_destroy_qp(struct ib_qp *ibqp, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_cq *scq = to_vcq(ibqp->send_cq), *rcq = to_vcq(ibqp->recv_cq);
	unsigned long flags;
	int err;

	/* allowed in every state: any failure means the device lost track */
	err = vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_QP, qp->qpn, true);
	if (err)
		dev_warn_ratelimited(&dev->vdev->dev, "destroying qpn 0x%x: %d; slot %u retired\n",
				     qp->qpn, err, qp->slot);

	/* under the CQ locks: no poll_cq still holds this QP from a lookup */
	spin_lock_irqsave(&scq->lock, flags);
	xa_erase(&dev->qps, qp->qpn);
	spin_unlock_irqrestore(&scq->lock, flags);
	if (rcq != scq) {
		spin_lock_irqsave(&rcq->lock, flags);
		spin_unlock_irqrestore(&rcq->lock, flags);
	}
	spin_lock_irqsave(&dev->slot_lock, flags);
	dev->qp_of_slot[qp->slot] = NULL;
	if (err)
		set_bit(qp->slot, dev->qp_slot_poisoned);
	spin_unlock_irqrestore(&dev->slot_lock, flags);

	if (!err && vrdma_qp_reclaim_all(dev, qp)) {
		vrdma_wq_free(&qp->sq);
		vrdma_wq_free(&qp->rq);
	}
	return 0;
}

int vrdma_modify_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask,
		    struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_modify_qp req = {};
	struct vrdma_qp_attr *a = &req.attr;
	int err;

	if (mask & ~VRDMA_QP_ATTR_MASK)
		return -EOPNOTSUPP;
	req.qpn = cpu_to_le32(qp->qpn);
	req.attr_mask = cpu_to_le32(mask);
	a->qp_state = attr->qp_state;
	a->cur_qp_state = attr->cur_qp_state;
	a->path_mtu = attr->path_mtu;
	a->timeout = attr->timeout;
	a->retry_cnt = attr->retry_cnt;
	a->rnr_retry = attr->rnr_retry;
	a->min_rnr_timer = attr->min_rnr_timer;
	a->max_rd_atomic = attr->max_rd_atomic;
	a->max_dest_rd_atomic = attr->max_dest_rd_atomic;
	a->pkey_index = cpu_to_le16(attr->pkey_index);
	a->qp_access_flags = cpu_to_le32(attr->qp_access_flags);
	a->qkey = cpu_to_le32(attr->qkey);
	a->rq_psn = cpu_to_le32(attr->rq_psn);
	a->sq_psn = cpu_to_le32(attr->sq_psn);
	a->dest_qp_num = cpu_to_le32(attr->dest_qp_num);
	a->port_num = attr->port_num;
	if (mask & IB_QP_AV) {
		err = vrdma_fill_ah_attr(dev, &attr->ah_attr, &a->ah);
		if (err)
			return err;
	}
	err = vrdma_exec(dev, VRDMA_CMD_MODIFY_QP, &req, sizeof(req), NULL, 0);
	if (err)
		return err;
	if (mask & IB_QP_STATE)
		WRITE_ONCE(qp->state, attr->qp_state);
	/* RESET drops outstanding WQEs: the device has returned their chains */
	if ((mask & IB_QP_STATE) && attr->qp_state == IB_QPS_RESET)
		vrdma_qp_reclaim_all(dev, qp);
	return 0;
}

int vrdma_query_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask,
		   struct ib_qp_init_attr *init)
{
	struct vrdma_dev *dev = to_vdev(ibqp->device);
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_handle req = { .handle = cpu_to_le32(qp->qpn) };
	struct vrdma_query_qp_resp r;
	const struct vrdma_qp_attr *a = &r.attr;
	union ib_gid dgid;
	int err;

	err = vrdma_exec(dev, VRDMA_CMD_QUERY_QP, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	if (a->qp_state > IB_QPS_ERR || r.qp_type != qp->type) {
		dev_err(&dev->vdev->dev, "QUERY_QP qpn 0x%x: state %u type %u\n",
			qp->qpn, a->qp_state, r.qp_type);
		return -EPROTO;
	}
	memset(attr, 0, sizeof(*attr));
	attr->qp_state = a->qp_state;
	attr->cur_qp_state = a->qp_state;
	attr->path_mtu = a->path_mtu;
	attr->path_mig_state = IB_MIG_MIGRATED;
	attr->qkey = le32_to_cpu(a->qkey);
	attr->rq_psn = le32_to_cpu(a->rq_psn) & 0xffffff;
	attr->sq_psn = le32_to_cpu(a->sq_psn) & 0xffffff;
	attr->dest_qp_num = le32_to_cpu(a->dest_qp_num) & 0xffffff;
	attr->qp_access_flags = le32_to_cpu(a->qp_access_flags);
	attr->pkey_index = le16_to_cpu(a->pkey_index);
	attr->sq_draining = a->sq_draining;
	attr->max_rd_atomic = a->max_rd_atomic;
	attr->max_dest_rd_atomic = a->max_dest_rd_atomic;
	attr->min_rnr_timer = a->min_rnr_timer;
	attr->port_num = a->port_num;
	attr->timeout = a->timeout;
	attr->retry_cnt = a->retry_cnt;
	attr->rnr_retry = a->rnr_retry;
	attr->cap.max_send_wr = qp->sq.nbufs;
	attr->cap.max_recv_wr = qp->rq.nbufs;
	attr->cap.max_send_sge = qp->max_send_sge;
	attr->cap.max_recv_sge = qp->max_recv_sge;
	attr->cap.max_inline_data = qp->max_inline_data;
	if (qp->type != VRDMA_QPT_UD && a->ah.sgid_index < dev->gid_tbl_len) {
		memcpy(dgid.raw, a->ah.dgid, sizeof(dgid.raw));
		attr->ah_attr.type = RDMA_AH_ATTR_TYPE_IB;
		rdma_ah_set_grh(&attr->ah_attr, &dgid, le32_to_cpu(a->ah.flow_label),
				a->ah.sgid_index, a->ah.hop_limit, a->ah.traffic_class);
		rdma_ah_set_sl(&attr->ah_attr, a->ah.sl);
		rdma_ah_set_port_num(&attr->ah_attr, 1);
		rdma_ah_set_static_rate(&attr->ah_attr, a->ah.static_rate);
	}

	memset(init, 0, sizeof(*init));
	init->qp_type = ibqp->qp_type;
	init->send_cq = ibqp->send_cq;
	init->recv_cq = ibqp->recv_cq;
	init->cap = attr->cap;
	init->sq_sig_type = qp->sq_sig_all ? IB_SIGNAL_ALL_WR : IB_SIGNAL_REQ_WR;
	return 0;
}

static int vrdma_send_opcode(enum ib_wr_opcode op, u8 qp_type, u8 *out)
{
	switch (op) {
	case IB_WR_SEND:
		*out = VRDMA_WR_SEND;
		return 0;
	case IB_WR_SEND_WITH_IMM:
		*out = VRDMA_WR_SEND_WITH_IMM;
		return 0;
	case IB_WR_RDMA_WRITE:
		*out = VRDMA_WR_RDMA_WRITE;
		return qp_type == VRDMA_QPT_UD ? -EINVAL : 0;
	case IB_WR_RDMA_WRITE_WITH_IMM:
		*out = VRDMA_WR_RDMA_WRITE_WITH_IMM;
		return qp_type == VRDMA_QPT_UD ? -EINVAL : 0;
	case IB_WR_RDMA_READ:
		*out = VRDMA_WR_RDMA_READ;
		return qp_type == VRDMA_QPT_RC ? 0 : -EINVAL;
	case IB_WR_ATOMIC_CMP_AND_SWP:
		*out = VRDMA_WR_ATOMIC_CMP_AND_SWP;
		return qp_type == VRDMA_QPT_RC ? 0 : -EINVAL;
	case IB_WR_ATOMIC_FETCH_AND_ADD:
		*out = VRDMA_WR_ATOMIC_FETCH_AND_ADD;
		return qp_type == VRDMA_QPT_RC ? 0 : -EINVAL;
	default:
		return -EINVAL;
	}
}

/*
 * Builds one send WQE into buf and returns its length. Inline data of a
 * user QP comes from user addresses (the SGEs are the caller's own), so
 * this may fault: callers hold no spinlock for user QPs.
 */
static ssize_t vrdma_build_send(struct vrdma_qp *qp, const struct ib_send_wr *wr,
				void *buf)
{
	struct vrdma_send_wqe *w = buf;
	struct vrdma_sge *sge = (struct vrdma_sge *)(w + 1);
	u8 *data = (u8 *)(w + 1);
	u32 total = 0;
	u8 opcode;
	int i, err;

	err = vrdma_send_opcode(wr->opcode, qp->type, &opcode);
	if (err)
		return err;
	if ((wr->send_flags & ~VRDMA_SEND_FLAGS) || wr->num_sge < 0)
		return -EINVAL;
	memset(w, 0, sizeof(*w));
	w->wr_id = cpu_to_le64(wr->wr_id);
	w->opcode = opcode;
	w->send_flags = wr->send_flags;	/* IB_SEND_* bits 0..3 are the ABI's */
	if (wr->opcode == IB_WR_SEND_WITH_IMM || wr->opcode == IB_WR_RDMA_WRITE_WITH_IMM)
		w->imm_data = wr->ex.imm_data;

	switch (opcode) {
	case VRDMA_WR_RDMA_WRITE:
	case VRDMA_WR_RDMA_WRITE_WITH_IMM:
	case VRDMA_WR_RDMA_READ:
		w->remote_addr = cpu_to_le64(rdma_wr(wr)->remote_addr);
		w->rkey = cpu_to_le32(rdma_wr(wr)->rkey);
		break;
	case VRDMA_WR_ATOMIC_CMP_AND_SWP:
	case VRDMA_WR_ATOMIC_FETCH_AND_ADD:
		w->remote_addr = cpu_to_le64(atomic_wr(wr)->remote_addr);
		w->compare_add = cpu_to_le64(atomic_wr(wr)->compare_add);
		w->swap = cpu_to_le64(atomic_wr(wr)->swap);
		w->rkey = cpu_to_le32(atomic_wr(wr)->rkey);
		break;
	}
	if (qp->type == VRDMA_QPT_UD) {
		if (!ud_wr(wr)->ah)
			return -EINVAL;
		w->ahn = cpu_to_le32(to_vah(ud_wr(wr)->ah)->ahn);
		w->remote_qpn = cpu_to_le32(ud_wr(wr)->remote_qpn);
		w->remote_qkey = cpu_to_le32(ud_wr(wr)->remote_qkey);
	}

	if (!(wr->send_flags & IB_SEND_INLINE)) {
		if (wr->num_sge > qp->max_send_sge)
			return -EINVAL;
		w->num_sge = cpu_to_le16(wr->num_sge);
		for (i = 0; i < wr->num_sge; i++) {
			sge[i].addr = cpu_to_le64(wr->sg_list[i].addr);
			sge[i].length = cpu_to_le32(wr->sg_list[i].length);
			sge[i].lkey = cpu_to_le32(wr->sg_list[i].lkey);
		}
		return sizeof(*w) + wr->num_sge * sizeof(*sge);
	}

	if (opcode > VRDMA_WR_SEND_WITH_IMM)
		return -EINVAL;
	for (i = 0; i < wr->num_sge; i++) {
		u32 len = wr->sg_list[i].length;
		u64 addr = wr->sg_list[i].addr;

		if (len > qp->max_inline_data - total)
			return -EINVAL;
		if (qp->user) {
			if (copy_from_user(data + total, u64_to_user_ptr(addr), len))
				return -EFAULT;
		} else {
			memcpy(data + total, (void *)(uintptr_t)addr, len);
		}
		total += len;
	}
	w->inline_len = cpu_to_le32(total);
	return sizeof(*w) + total;
}

int vrdma_post_send(struct ib_qp *ibqp, const struct ib_send_wr *wr,
		    const struct ib_send_wr **bad_wr)
{
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_wq *wq = &qp->sq;
	unsigned long flags;
	void *scratch = NULL;
	ssize_t len;
	int idx, err = 0;
	u8 state = READ_ONCE(qp->state);

	/* no send queue before RTS: an immediate error, as the verbs say */
	if (state == IB_QPS_RESET || state == IB_QPS_INIT || state == IB_QPS_RTR) {
		*bad_wr = wr;
		return -EINVAL;
	}
	if (qp->user) {
		scratch = kmalloc(wq->buf_size, GFP_KERNEL);
		if (!scratch) {
			*bad_wr = wr;
			return -ENOMEM;
		}
	}
	for (; wr; wr = wr->next) {
		if (scratch) {
			len = vrdma_build_send(qp, wr, scratch);
			if (len < 0) {
				err = len;
				break;
			}
		}
		spin_lock_irqsave(&wq->lock, flags);
		idx = vrdma_wq_get(wq);
		if (idx < 0) {
			err = idx;
		} else {
			if (scratch)
				memcpy(wq->bufs[idx], scratch, len);
			else
				len = vrdma_build_send(qp, wr, wq->bufs[idx]);
			err = len < 0 ? len : vrdma_wq_add(wq, idx, len);
			if (err)
				clear_bit(idx, wq->busy);
		}
		spin_unlock_irqrestore(&wq->lock, flags);
		if (err)
			break;
	}
	spin_lock_irqsave(&wq->lock, flags);
	virtqueue_kick(wq->vq);
	spin_unlock_irqrestore(&wq->lock, flags);
	kfree(scratch);
	if (err)
		*bad_wr = wr;
	return err;
}

int vrdma_post_recv(struct ib_qp *ibqp, const struct ib_recv_wr *wr,
		    const struct ib_recv_wr **bad_wr)
{
	struct vrdma_qp *qp = to_vqp(ibqp);
	struct vrdma_wq *wq = &qp->rq;
	struct vrdma_recv_wqe *w;
	struct vrdma_sge *sge;
	unsigned long flags;
	int idx, i, err = 0;

	/* receives are taken from INIT on */
	if (READ_ONCE(qp->state) == IB_QPS_RESET) {
		*bad_wr = wr;
		return -EINVAL;
	}
	spin_lock_irqsave(&wq->lock, flags);
	for (; wr; wr = wr->next) {
		if (wr->num_sge < 0 || wr->num_sge > qp->max_recv_sge) {
			err = -EINVAL;
			break;
		}
		idx = vrdma_wq_get(wq);
		if (idx < 0) {
			err = idx;
			break;
		}
		w = wq->bufs[idx];
		sge = (struct vrdma_sge *)(w + 1);
		memset(w, 0, sizeof(*w));
		w->wr_id = cpu_to_le64(wr->wr_id);
		w->num_sge = cpu_to_le16(wr->num_sge);
		for (i = 0; i < wr->num_sge; i++) {
			sge[i].addr = cpu_to_le64(wr->sg_list[i].addr);
			sge[i].length = cpu_to_le32(wr->sg_list[i].length);
			sge[i].lkey = cpu_to_le32(wr->sg_list[i].lkey);
		}
		err = vrdma_wq_add(wq, idx, sizeof(*w) + wr->num_sge * sizeof(*sge));
		if (err) {
			clear_bit(idx, wq->busy);
			break;
		}
	}
	virtqueue_kick(wq->vq);
	spin_unlock_irqrestore(&wq->lock, flags);
	if (err)
		*bad_wr = wr;
	return err;
}

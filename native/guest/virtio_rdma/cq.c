// SPDX-License-Identifier: GPL-2.0
/*
 * Completion queues: each CQ owns the virtqueue of the slot the device
 * gave it, kept stocked with 48-byte device-writable CQE buffers.
 */
#include <linux/slab.h>
#include <linux/virtio_config.h>

#include "virtio_rdma.h"

static int vrdma_cq_post(struct vrdma_cq *cq, unsigned int i, gfp_t gfp)
{
	struct scatterlist sg;

	sg_init_one(&sg, &cq->bufs[i], sizeof(cq->bufs[i]));
	return virtqueue_add_inbuf(cq->vq, &sg, 1, &cq->bufs[i], gfp);
}

/* the buffer index behind a token the ring handed back, or -1 */
static int vrdma_cq_buf_index(struct vrdma_cq *cq, void *token)
{
	uintptr_t base = (uintptr_t)cq->bufs, t = (uintptr_t)token;

	if (t < base || t - base >= (uintptr_t)cq->nbufs * sizeof(*cq->bufs) ||
	    (t - base) % sizeof(*cq->bufs))
		return -1;
	return (t - base) / sizeof(*cq->bufs);
}

/*
 * After DESTROY_CQ the device has returned every buffer (before the
 * command's own chain). Take them back; if it kept any, it may still
 * write them, so they and the slot are retired instead of reused.
 */
static bool vrdma_cq_reclaim(struct vrdma_dev *dev, struct vrdma_cq *cq)
{
	unsigned long flags;
	unsigned int len;
	bool empty;

	spin_lock_irqsave(&cq->lock, flags);
	while (virtqueue_get_buf(cq->vq, &len))
		;
	empty = cq->vq->num_free == virtqueue_get_vring_size(cq->vq);
	spin_unlock_irqrestore(&cq->lock, flags);
	if (!empty) {
		dev_err(&dev->vdev->dev, "cqn %u: device kept CQE buffers after DESTROY_CQ; retiring slot %u\n",
			cq->cqn, cq->slot);
		spin_lock_irqsave(&dev->slot_lock, flags);
		set_bit(cq->slot, dev->cq_slot_poisoned);
		spin_unlock_irqrestore(&dev->slot_lock, flags);
	}
	return empty;
}

void vrdma_cq_done(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;
	struct vrdma_cq *cq;
	unsigned long flags;

	if (!dev || vq->index < 1 || vq->index > dev->num_cq_slots)
		return;
	/* slot_lock keeps the CQ alive until its handler returns */
	spin_lock_irqsave(&dev->slot_lock, flags);
	cq = dev->cq_of_slot[vq->index - 1];
	if (cq && cq->ibcq.comp_handler)
		cq->ibcq.comp_handler(&cq->ibcq, cq->ibcq.cq_context);
	spin_unlock_irqrestore(&dev->slot_lock, flags);
}

static int vrdma_cq_check_slot(struct vrdma_dev *dev, struct vrdma_cq *cq)
{
	unsigned long flags;
	int err = 0;

	if (cq->slot >= dev->num_cq_slots)
		return -EPROTO;
	/* claimed at once, so a device handing out one slot twice is caught */
	spin_lock_irqsave(&dev->slot_lock, flags);
	if (dev->cq_of_slot[cq->slot] || test_bit(cq->slot, dev->cq_slot_poisoned))
		err = -EPROTO;
	else
		dev->cq_of_slot[cq->slot] = cq;
	spin_unlock_irqrestore(&dev->slot_lock, flags);
	return err;
}

static void vrdma_cq_release_slot(struct vrdma_dev *dev, struct vrdma_cq *cq)
{
	unsigned long flags;

	spin_lock_irqsave(&dev->slot_lock, flags);
	dev->cq_of_slot[cq->slot] = NULL;
	spin_unlock_irqrestore(&dev->slot_lock, flags);
}

int vrdma_create_cq(struct ib_cq *ibcq, const struct ib_cq_init_attr *attr,
		    VRDMA_CREATE_CQ_UDATA)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	struct vrdma_create_cq req = {};
	struct vrdma_create_cq_resp r;
	unsigned long flags;
	unsigned int i;
	u32 granted;
	int err;

	if (attr->flags)
		return -EOPNOTSUPP;
	if (attr->cqe < 1 || attr->cqe > dev->attrs.max_cqe)
		return -EINVAL;
	spin_lock_init(&cq->lock);

	req.cqe = cpu_to_le32(attr->cqe);
	err = vrdma_exec(dev, VRDMA_CMD_CREATE_CQ, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	cq->cqn = le32_to_cpu(r.cqn);
	cq->slot = le32_to_cpu(r.slot);
	granted = le32_to_cpu(r.cqe);
	if (!cq->cqn || vrdma_cq_check_slot(dev, cq)) {
		dev_err(&dev->vdev->dev, "CREATE_CQ: cqn %u in slot %u, which is not a free slot of %u\n",
			cq->cqn, cq->slot, dev->num_cq_slots);
		vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_CQ, cq->cqn, true);
		return -EPROTO;
	}
	cq->vq = dev->vqs[vrdma_cq_vq(cq->slot)];
	/* cqe + 1 buffers: the device keeps the last one for an overflow event */
	if (granted < attr->cqe || granted >= virtqueue_get_vring_size(cq->vq)) {
		dev_err(&dev->vdev->dev, "CREATE_CQ: cqn %u granted %u entries (asked %u, ring %u)\n",
			cq->cqn, granted, attr->cqe, virtqueue_get_vring_size(cq->vq));
		err = -EPROTO;
		goto err_destroy;
	}
	cq->nbufs = granted + 1;
	cq->bufs = kcalloc(cq->nbufs, sizeof(*cq->bufs), GFP_KERNEL);
	if (!cq->bufs) {
		err = -ENOMEM;
		goto err_destroy;
	}
	spin_lock_irqsave(&cq->lock, flags);
	for (i = 0; i < cq->nbufs && !err; i++)
		err = vrdma_cq_post(cq, i, GFP_ATOMIC);
	virtqueue_kick(cq->vq);
	spin_unlock_irqrestore(&cq->lock, flags);
	if (err) {
		dev_err(&dev->vdev->dev, "cqn %u: posting %u CQE buffers failed: %d\n",
			cq->cqn, cq->nbufs, err);
		goto err_destroy_bufs;
	}
	ibcq->cqe = granted;
	return 0;

err_destroy_bufs:
	if (!vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_CQ, cq->cqn, true) &&
	    vrdma_cq_reclaim(dev, cq))
		kfree(cq->bufs);
	vrdma_cq_release_slot(dev, cq);
	return err;
err_destroy:
	vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_CQ, cq->cqn, true);
	vrdma_cq_release_slot(dev, cq);
	return err;
}

int vrdma_destroy_cq(struct ib_cq *ibcq, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	unsigned long flags;
	int err;

	err = vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_CQ, cq->cqn, true);
	if (err == -EBUSY)
		return err;
	if (err)
		dev_warn_ratelimited(&dev->vdev->dev, "destroying cqn %u: %d; slot %u retired\n",
				     cq->cqn, err, cq->slot);
	spin_lock_irqsave(&dev->slot_lock, flags);
	dev->cq_of_slot[cq->slot] = NULL;
	/* a device that did not confirm may still write the buffers */
	if (err)
		set_bit(cq->slot, dev->cq_slot_poisoned);
	spin_unlock_irqrestore(&dev->slot_lock, flags);
	if (!err && vrdma_cq_reclaim(dev, cq))
		kfree(cq->bufs);
	return 0;
}

static bool vrdma_wc_opcode(u8 op, enum ib_wc_opcode *out)
{
	switch (op) {
	case IB_WC_SEND:
	case IB_WC_RDMA_WRITE:
	case IB_WC_RDMA_READ:
	case IB_WC_COMP_SWAP:
	case IB_WC_FETCH_ADD:
	case IB_WC_RECV:
	case IB_WC_RECV_RDMA_WITH_IMM:
		*out = op;
		return true;
	default:
		return false;
	}
}

/* false if the CQE names nothing this CQ could have produced */
static bool vrdma_cqe_to_wc(struct vrdma_dev *dev, struct vrdma_cq *cq,
			    const struct vrdma_cqe *e, struct ib_wc *wc)
{
	u32 qpn = le32_to_cpu(e->qp_num);
	u16 flags = le16_to_cpu(e->wc_flags);
	struct vrdma_qp *qp;

	qp = vrdma_qp_lookup(dev, qpn);
	if (!qp || (qp->ibqp.send_cq != &cq->ibcq && qp->ibqp.recv_cq != &cq->ibcq)) {
		dev_warn_ratelimited(&dev->vdev->dev, "cqn %u: CQE for unknown qpn 0x%x dropped\n",
				     cq->cqn, qpn);
		return false;
	}
	if (e->status > IB_WC_GENERAL_ERR || !vrdma_wc_opcode(e->opcode, &wc->opcode) ||
	    (flags & ~(VRDMA_WC_FLAG_GRH | VRDMA_WC_FLAG_WITH_IMM))) {
		dev_warn_ratelimited(&dev->vdev->dev, "cqn %u: malformed CQE (status %u opcode %u flags 0x%x) dropped\n",
				     cq->cqn, e->status, e->opcode, flags);
		return false;
	}
	memset(wc, 0, sizeof(*wc));
	wc->wr_id = le64_to_cpu(e->wr_id);
	wc->status = e->status;
	vrdma_wc_opcode(e->opcode, &wc->opcode);
	wc->vendor_err = le32_to_cpu(e->vendor_err);
	wc->byte_len = le32_to_cpu(e->byte_len);
	wc->qp = &qp->ibqp;
	wc->port_num = 1;
	if (wc->status != IB_WC_SUCCESS)
		return true;
	if (flags & VRDMA_WC_FLAG_GRH)
		wc->wc_flags |= IB_WC_GRH;
	if (flags & VRDMA_WC_FLAG_WITH_IMM) {
		wc->wc_flags |= IB_WC_WITH_IMM;
		wc->ex.imm_data = e->imm_data;
	}
	wc->src_qp = le32_to_cpu(e->src_qp) & 0xffffff;
	wc->pkey_index = le16_to_cpu(e->pkey_index);
	wc->sl = e->sl;
	return true;
}

int vrdma_poll_cq(struct ib_cq *ibcq, int num_entries, struct ib_wc *wc)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	bool cq_error = false, posted = false;
	u32 lost_qpn = 0;
	struct vrdma_cqe e;
	unsigned long flags;
	unsigned int len;
	int n = 0, i;
	void *token;

	spin_lock_irqsave(&cq->lock, flags);
	while (n < num_entries && (token = virtqueue_get_buf(cq->vq, &len))) {
		i = vrdma_cq_buf_index(cq, token);
		if (WARN_ON_ONCE(i < 0))
			break;	/* the ring returned a token we never posted */
		e = cq->bufs[i];
		if (vrdma_cq_post(cq, i, GFP_ATOMIC))
			dev_err_ratelimited(&dev->vdev->dev, "cqn %u: reposting a CQE buffer failed\n",
					    cq->cqn);
		else
			posted = true;
		if (len != sizeof(e)) {
			if (len)
				dev_warn_ratelimited(&dev->vdev->dev, "cqn %u: CQE with used length %u dropped\n",
						     cq->cqn, len);
			continue;
		}
		if (e.opcode == VRDMA_WC_OPCODE_CQ_ERROR) {
			cq_error = !cq->error_reported;
			cq->error_reported = true;
			lost_qpn = le32_to_cpu(e.qp_num);
			continue;
		}
		if (vrdma_cqe_to_wc(dev, cq, &e, &wc[n]))
			n++;
	}
	if (posted)
		virtqueue_kick(cq->vq);
	spin_unlock_irqrestore(&cq->lock, flags);

	if (cq_error) {
		dev_err(&dev->vdev->dev, "cqn %u overflowed (lost a completion of qpn 0x%x)\n",
			cq->cqn, lost_qpn);
		if (ibcq->event_handler) {
			struct ib_event ev = {
				.device = ibcq->device,
				.event = IB_EVENT_CQ_ERR,
				.element.cq = ibcq,
			};

			ibcq->event_handler(&ev, ibcq->cq_context);
		}
	}
	return n;
}

int vrdma_req_notify_cq(struct ib_cq *ibcq, enum ib_cq_notify_flags flags)
{
	struct vrdma_dev *dev = to_vdev(ibcq->device);
	struct vrdma_cq *cq = to_vcq(ibcq);
	struct vrdma_req_notify_cq req = { .cqn = cpu_to_le32(cq->cqn) };
	unsigned long irqflags;
	unsigned int last;
	bool more;
	int err;

	req.flags = cpu_to_le32((flags & IB_CQ_SOLICITED_MASK) == IB_CQ_SOLICITED ?
				VRDMA_NOTIFY_SOLICITED : VRDMA_NOTIFY_NEXT_COMPLETION);
	/* kernel consumers re-arm from their completion handlers */
	err = vrdma_exec_atomic(dev, VRDMA_CMD_REQ_NOTIFY_CQ, &req, sizeof(req), NULL, 0);
	if (err)
		return err;
	if (!(flags & IB_CQ_REPORT_MISSED_EVENTS))
		return 0;
	/* a CQE written before the arm took effect raises no interrupt */
	spin_lock_irqsave(&cq->lock, irqflags);
	last = virtqueue_enable_cb_prepare(cq->vq);
	more = virtqueue_poll(cq->vq, last);
	spin_unlock_irqrestore(&cq->lock, irqflags);
	return more ? 1 : 0;
}

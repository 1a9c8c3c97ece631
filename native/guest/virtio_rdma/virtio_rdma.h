/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio_rdma: RDMA driver for the vrdma virtio-rdma device.
 */
#ifndef VIRTIO_RDMA_H
#define VIRTIO_RDMA_H

#include <linux/mutex.h>
#include <linux/version.h>
#include <linux/spinlock.h>
#include <linux/virtio.h>
#include <linux/xarray.h>
#include <rdma/ib_umem.h>
#include <rdma/ib_verbs.h>

#include "virtio_rdma_abi.h"

/*
 * Built for Debian 12's 6.1 and bookworm-backports' 6.12. Between them
 * (both in 6.11) create_cq started taking the whole uverbs attribute
 * bundle, and virtio_find_vqs() a struct virtqueue_info array.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
#define VRDMA_CREATE_CQ_UDATA	struct uverbs_attr_bundle *attrs
#define VRDMA_HAVE_VQS_INFO	1
#else
#define VRDMA_CREATE_CQ_UDATA	struct ib_udata *udata
#define VRDMA_HAVE_VQS_INFO	0
#endif

struct vrdma_dev {
	struct ib_device ib;
	struct virtio_device *vdev;
	struct virtqueue **vqs;		/* 1 + C + 2Q */
	unsigned int nvqs;
	u16 num_cq_slots;
	u16 num_qp_slots;
	u16 gid_tbl_len;

	/* the smallest ring of each kind bounds what any CQ or QP can hold */
	unsigned int cq_ring_min;
	unsigned int qp_ring_min;

	struct ib_device_attr attrs;
	u32 max_inline_data;

	/* control queue */
	spinlock_t ctrl_lock;		/* the control virtqueue */
	struct mutex ctrl_mutex;	/* one sleeping command at a time */
	bool broken;			/* no more commands until reset */

	/* object lookups for the interrupt and completion paths */
	spinlock_t slot_lock;
	struct vrdma_cq **cq_of_slot;	/* [C] */
	struct vrdma_qp **qp_of_slot;	/* [Q] */
	unsigned long *qp_slot_poisoned; /* rings the device did not give back */
	unsigned long *cq_slot_poisoned;
	struct xarray qps;		/* qpn -> struct vrdma_qp */
};

struct vrdma_ucontext {
	struct ib_ucontext ibuc;
};

struct vrdma_pd {
	struct ib_pd ibpd;
	u32 pdn;
};

struct vrdma_mr {
	struct ib_mr ibmr;
	struct ib_umem *umem;
	u32 mrn;
};

struct vrdma_ah {
	struct ib_ah ibah;
	u32 ahn;
};

struct vrdma_cq {
	struct ib_cq ibcq;
	u32 cqn;
	u32 slot;
	struct virtqueue *vq;
	spinlock_t lock;		/* the CQ's virtqueue */
	struct vrdma_cqe *bufs;
	unsigned int nbufs;
	bool error_reported;
};

/* a send or receive queue: one pre-allocated buffer per outstanding WQE */
struct vrdma_wq {
	struct virtqueue *vq;
	spinlock_t lock;
	void **bufs;
	unsigned long *busy;
	unsigned int nbufs;
	size_t buf_size;
};

struct vrdma_qp {
	struct ib_qp ibqp;
	u32 qpn;
	u32 slot;
	u8 type;			/* VRDMA_QPT_* */
	bool user;
	bool sq_sig_all;
	/*
	 * The state the last MODIFY_QP set (the device may since have moved
	 * the QP to ERR, where posting is allowed too): posts are refused
	 * in the states where the verbs say so, before the device sees them.
	 */
	u8 state;			/* enum ib_qp_state */
	u32 max_send_sge;
	u32 max_recv_sge;
	u32 max_inline_data;
	struct vrdma_wq sq;
	struct vrdma_wq rq;
};

static inline struct vrdma_dev *to_vdev(struct ib_device *ib)
{
	return container_of(ib, struct vrdma_dev, ib);
}

static inline struct vrdma_pd *to_vpd(struct ib_pd *pd)
{
	return container_of(pd, struct vrdma_pd, ibpd);
}

static inline struct vrdma_mr *to_vmr(struct ib_mr *mr)
{
	return container_of(mr, struct vrdma_mr, ibmr);
}

static inline struct vrdma_ah *to_vah(struct ib_ah *ah)
{
	return container_of(ah, struct vrdma_ah, ibah);
}

static inline struct vrdma_cq *to_vcq(struct ib_cq *cq)
{
	return container_of(cq, struct vrdma_cq, ibcq);
}

static inline struct vrdma_qp *to_vqp(struct ib_qp *qp)
{
	return container_of(qp, struct vrdma_qp, ibqp);
}

static inline unsigned int vrdma_cq_vq(u32 slot)
{
	return 1 + slot;
}

static inline unsigned int vrdma_sq_vq(struct vrdma_dev *dev, u32 slot)
{
	return 1 + dev->num_cq_slots + 2 * slot;
}

/* ctrl.c */
int vrdma_exec(struct vrdma_dev *dev, u32 cmd, const void *req, size_t req_len,
	       void *resp, size_t resp_len);
int vrdma_exec_atomic(struct vrdma_dev *dev, u32 cmd, const void *req,
		      size_t req_len, void *resp, size_t resp_len);
void vrdma_ctrl_done(struct virtqueue *vq);
int vrdma_destroy_handle(struct vrdma_dev *dev, u32 cmd, u32 handle,
			 bool can_sleep);

/* the device did not answer (properly): it may still use what it had */
static inline bool vrdma_no_answer(int err)
{
	return err == -EIO || err == -ETIMEDOUT || err == -EPROTO;
}

/* main.c */
int vrdma_query_port_cmd(struct vrdma_dev *dev, u32 port,
			 struct ib_port_attr *attr);

/* verbs.c */
int vrdma_alloc_pd(struct ib_pd *ibpd, struct ib_udata *udata);
int vrdma_dealloc_pd(struct ib_pd *ibpd, struct ib_udata *udata);
struct ib_mr *vrdma_get_dma_mr(struct ib_pd *ibpd, int access);
struct ib_mr *vrdma_reg_user_mr(struct ib_pd *ibpd, u64 start, u64 length,
				u64 virt_addr, int access,
				struct ib_udata *udata);
int vrdma_dereg_mr(struct ib_mr *ibmr, struct ib_udata *udata);
int vrdma_create_ah(struct ib_ah *ibah, struct rdma_ah_init_attr *init,
		    struct ib_udata *udata);
int vrdma_destroy_ah(struct ib_ah *ibah, u32 flags);
int vrdma_fill_ah_attr(struct vrdma_dev *dev, const struct rdma_ah_attr *src,
		       struct vrdma_ah_attr *dst);

/* cq.c */
int vrdma_create_cq(struct ib_cq *ibcq, const struct ib_cq_init_attr *attr,
		    VRDMA_CREATE_CQ_UDATA);
int vrdma_destroy_cq(struct ib_cq *ibcq, struct ib_udata *udata);
int vrdma_poll_cq(struct ib_cq *ibcq, int num_entries, struct ib_wc *wc);
int vrdma_req_notify_cq(struct ib_cq *ibcq, enum ib_cq_notify_flags flags);
void vrdma_cq_done(struct virtqueue *vq);

/* qp.c */
int vrdma_create_qp(struct ib_qp *ibqp, struct ib_qp_init_attr *init,
		    struct ib_udata *udata);
int vrdma_modify_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask,
		    struct ib_udata *udata);
int vrdma_query_qp(struct ib_qp *ibqp, struct ib_qp_attr *attr, int mask,
		   struct ib_qp_init_attr *init);
int vrdma_destroy_qp(struct ib_qp *ibqp, struct ib_udata *udata);
int vrdma_post_send(struct ib_qp *ibqp, const struct ib_send_wr *wr,
		    const struct ib_send_wr **bad_wr);
int vrdma_post_recv(struct ib_qp *ibqp, const struct ib_recv_wr *wr,
		    const struct ib_recv_wr **bad_wr);
struct vrdma_qp *vrdma_qp_lookup(struct vrdma_dev *dev, u32 qpn);

#endif /* VIRTIO_RDMA_H */

// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * rdma-core provider for the virtio-rdma device (virtio device ID 42).
 *
 * The data path is kernel-mediated (docs/virtio-rdma.md, ARCHITECTURE.md
 * decision 10): the virtio_rdma kernel driver owns every virtqueue, so this
 * provider maps each verb onto the generic uverbs command of the same name
 * and keeps no device state of its own. No driver-specific command or
 * response data is exchanged; the kernel driver's uverbs ABI version is
 * VIRTIO_RDMA_UVERBS_ABI_VERSION.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <infiniband/driver.h>
#include <infiniband/verbs.h>

#define VIRTIO_RDMA_UVERBS_ABI_VERSION 1

struct virtio_rdma_device {
	struct verbs_device ibv_dev;
};

struct virtio_rdma_context {
	struct verbs_context ibv_ctx;
};

static int virtio_rdma_query_device(struct ibv_context *context,
				    const struct ibv_query_device_ex_input *input,
				    struct ibv_device_attr_ex *attr,
				    size_t attr_size)
{
	struct ib_uverbs_ex_query_device_resp resp;
	size_t resp_size = sizeof(resp);

	return ibv_cmd_query_device_any(context, input, attr, attr_size, &resp,
					&resp_size);
}

static int virtio_rdma_query_port(struct ibv_context *context, uint8_t port,
				  struct ibv_port_attr *attr)
{
	struct ibv_query_port cmd;

	return ibv_cmd_query_port(context, port, attr, &cmd, sizeof(cmd));
}

static struct ibv_pd *virtio_rdma_alloc_pd(struct ibv_context *context)
{
	struct ib_uverbs_alloc_pd_resp resp;
	struct ibv_alloc_pd cmd;
	struct ibv_pd *pd;

	pd = calloc(1, sizeof(*pd));
	if (!pd)
		return NULL;
	if (ibv_cmd_alloc_pd(context, pd, &cmd, sizeof(cmd), &resp,
			     sizeof(resp))) {
		free(pd);
		return NULL;
	}
	return pd;
}

static int virtio_rdma_dealloc_pd(struct ibv_pd *pd)
{
	int ret = ibv_cmd_dealloc_pd(pd);

	if (!ret)
		free(pd);
	return ret;
}

static struct ibv_mr *virtio_rdma_reg_mr(struct ibv_pd *pd, void *addr,
					 size_t length, uint64_t hca_va,
					 int access)
{
	struct ib_uverbs_reg_mr_resp resp;
	struct ibv_reg_mr cmd;
	struct verbs_mr *vmr;

	vmr = calloc(1, sizeof(*vmr));
	if (!vmr)
		return NULL;
	if (ibv_cmd_reg_mr(pd, addr, length, hca_va, access, vmr, &cmd,
			   sizeof(cmd), &resp, sizeof(resp))) {
		free(vmr);
		return NULL;
	}
	return &vmr->ibv_mr;
}

static int virtio_rdma_dereg_mr(struct verbs_mr *vmr)
{
	int ret = ibv_cmd_dereg_mr(vmr);

	if (!ret)
		free(vmr);
	return ret;
}

static struct ibv_cq *virtio_rdma_create_cq(struct ibv_context *context,
					    int cqe,
					    struct ibv_comp_channel *channel,
					    int comp_vector)
{
	struct ib_uverbs_create_cq_resp resp;
	struct ibv_create_cq cmd;
	struct ibv_cq *cq;

	cq = calloc(1, sizeof(*cq));
	if (!cq)
		return NULL;
	if (ibv_cmd_create_cq(context, cqe, channel, comp_vector, cq, &cmd,
			      sizeof(cmd), &resp, sizeof(resp))) {
		free(cq);
		return NULL;
	}
	return cq;
}

static int virtio_rdma_destroy_cq(struct ibv_cq *cq)
{
	int ret = ibv_cmd_destroy_cq(cq);

	if (!ret)
		free(cq);
	return ret;
}

static struct ibv_qp *virtio_rdma_create_qp(struct ibv_pd *pd,
					    struct ibv_qp_init_attr *attr)
{
	struct ib_uverbs_create_qp_resp resp;
	struct ibv_create_qp cmd;
	struct ibv_qp *qp;

	qp = calloc(1, sizeof(*qp));
	if (!qp)
		return NULL;
	if (ibv_cmd_create_qp(pd, qp, attr, &cmd, sizeof(cmd), &resp,
			      sizeof(resp))) {
		free(qp);
		return NULL;
	}
	return qp;
}

static int virtio_rdma_query_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr,
				int attr_mask, struct ibv_qp_init_attr *init_attr)
{
	struct ibv_query_qp cmd;

	return ibv_cmd_query_qp(qp, attr, attr_mask, init_attr, &cmd,
				sizeof(cmd));
}

static int virtio_rdma_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr,
				 int attr_mask)
{
	struct ibv_modify_qp cmd;

	return ibv_cmd_modify_qp(qp, attr, attr_mask, &cmd, sizeof(cmd));
}

static int virtio_rdma_destroy_qp(struct ibv_qp *qp)
{
	int ret = ibv_cmd_destroy_qp(qp);

	if (!ret)
		free(qp);
	return ret;
}

static struct ibv_ah *virtio_rdma_create_ah(struct ibv_pd *pd,
					    struct ibv_ah_attr *attr)
{
	struct ib_uverbs_create_ah_resp resp;
	struct ibv_ah *ah;

	ah = calloc(1, sizeof(*ah));
	if (!ah)
		return NULL;
	if (ibv_cmd_create_ah(pd, ah, attr, &resp, sizeof(resp))) {
		free(ah);
		return NULL;
	}
	return ah;
}

static int virtio_rdma_destroy_ah(struct ibv_ah *ah)
{
	int ret = ibv_cmd_destroy_ah(ah);

	if (!ret)
		free(ah);
	return ret;
}

static void virtio_rdma_free_context(struct ibv_context *ibctx);

/* Sorted like struct verbs_context_ops. */
static const struct verbs_context_ops virtio_rdma_ctx_ops = {
	.alloc_pd = virtio_rdma_alloc_pd,
	.create_ah = virtio_rdma_create_ah,
	.create_cq = virtio_rdma_create_cq,
	.create_qp = virtio_rdma_create_qp,
	.dealloc_pd = virtio_rdma_dealloc_pd,
	.dereg_mr = virtio_rdma_dereg_mr,
	.destroy_ah = virtio_rdma_destroy_ah,
	.destroy_cq = virtio_rdma_destroy_cq,
	.destroy_qp = virtio_rdma_destroy_qp,
	.free_context = virtio_rdma_free_context,
	.modify_qp = virtio_rdma_modify_qp,
	.poll_cq = ibv_cmd_poll_cq,
	.post_recv = ibv_cmd_post_recv,
	.post_send = ibv_cmd_post_send,
	.query_device_ex = virtio_rdma_query_device,
	.query_port = virtio_rdma_query_port,
	.query_qp = virtio_rdma_query_qp,
	.reg_mr = virtio_rdma_reg_mr,
	.req_notify_cq = ibv_cmd_req_notify_cq,
};

static struct verbs_context *virtio_rdma_alloc_context(struct ibv_device *ibdev,
						       int cmd_fd,
						       void *private_data)
{
	struct ib_uverbs_get_context_resp resp;
	struct virtio_rdma_context *ctx;
	struct ibv_get_context cmd;

	ctx = verbs_init_and_alloc_context(ibdev, cmd_fd, ctx, ibv_ctx,
					   RDMA_DRIVER_UNKNOWN);
	if (!ctx)
		return NULL;
	if (ibv_cmd_get_context(&ctx->ibv_ctx, &cmd, sizeof(cmd), &resp,
				sizeof(resp))) {
		verbs_uninit_context(&ctx->ibv_ctx);
		free(ctx);
		return NULL;
	}
	verbs_set_ops(&ctx->ibv_ctx, &virtio_rdma_ctx_ops);
	return &ctx->ibv_ctx;
}

static void virtio_rdma_free_context(struct ibv_context *ibctx)
{
	struct virtio_rdma_context *ctx =
		container_of(ibctx, struct virtio_rdma_context, ibv_ctx.context);

	verbs_uninit_context(&ctx->ibv_ctx);
	free(ctx);
}

static struct verbs_device *
virtio_rdma_alloc_device(struct verbs_sysfs_dev *sysfs_dev)
{
	struct virtio_rdma_device *dev;

	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return NULL;
	return &dev->ibv_dev;
}

static void virtio_rdma_uninit_device(struct verbs_device *verbs_dev)
{
	free(container_of(verbs_dev, struct virtio_rdma_device, ibv_dev));
}

/*
 * The ib_device's parent is the virtio device, whose modalias names the
 * virtio device ID; no rdma_driver_id exists for an out-of-tree driver.
 */
static const struct verbs_match_ent virtio_rdma_match_table[] = {
	VERBS_MODALIAS_MATCH("virtio:d0000002Av*", NULL),
	{},
};

static const struct verbs_device_ops virtio_rdma_dev_ops = {
	.name = "virtio_rdma",
	.match_min_abi_version = VIRTIO_RDMA_UVERBS_ABI_VERSION,
	.match_max_abi_version = VIRTIO_RDMA_UVERBS_ABI_VERSION,
	.match_table = virtio_rdma_match_table,
	.alloc_device = virtio_rdma_alloc_device,
	.uninit_device = virtio_rdma_uninit_device,
	.alloc_context = virtio_rdma_alloc_context,
};

PROVIDER_DRIVER(virtio_rdma, virtio_rdma_dev_ops);

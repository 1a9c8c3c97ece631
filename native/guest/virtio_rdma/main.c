// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_rdma: probe/remove and ib_device registration for the vrdma
 * virtio-rdma device (virtio ID 42; ABI in docs/virtio-rdma.md).
 *
 * The port is registered as an IB-protocol port with an Ethernet link
 * layer and a required GRH: the device owns its GIDs (host addresses the
 * back-end sends RoCEv2 from), and only a non-RoCE port makes the 6.1 core
 * fill its GID table from query_gid instead of from a guest netdev. See
 * README.md.
 */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>
#include <rdma/ib_user_verbs.h>

#include "virtio_rdma.h"

#define VRDMA_UVERBS_ABI_VERSION	1
#define VRDMA_MAX_VQS			1024	/* virtio-pci's limit */
/* bounds on what we size allocations by, whatever the device claims */
#define VRDMA_SANE_MAX_SGE		256
#define VRDMA_SANE_MAX_INLINE		4096

static u32 clamp_le32(__le32 v)
{
	return min_t(u32, le32_to_cpu(v), INT_MAX);
}

static int vrdma_query_device(struct ib_device *ib, struct ib_device_attr *attr,
			      struct ib_udata *udata)
{
	if (udata && (udata->inlen || udata->outlen))
		return -EINVAL;
	*attr = to_vdev(ib)->attrs;
	return 0;
}

int vrdma_query_port_cmd(struct vrdma_dev *dev, u32 port,
			 struct ib_port_attr *attr)
{
	struct vrdma_handle req = { .handle = cpu_to_le32(port) };
	struct vrdma_query_port_resp r;
	int err;

	err = vrdma_exec(dev, VRDMA_CMD_QUERY_PORT, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	if (r.state < IB_PORT_NOP || r.state > IB_PORT_ACTIVE_DEFER ||
	    r.max_mtu < IB_MTU_256 || r.max_mtu > IB_MTU_4096 ||
	    r.active_mtu < IB_MTU_256 || r.active_mtu > r.max_mtu ||
	    le32_to_cpu(r.gid_tbl_len) != dev->gid_tbl_len ||
	    le16_to_cpu(r.pkey_tbl_len) == 0) {
		dev_err(&dev->vdev->dev, "QUERY_PORT: impossible answer (state %u, mtu %u/%u, %u GIDs, %u P_Keys)\n",
			r.state, r.active_mtu, r.max_mtu, le32_to_cpu(r.gid_tbl_len),
			le16_to_cpu(r.pkey_tbl_len));
		return -EPROTO;
	}
	attr->state = r.state;
	attr->max_mtu = r.max_mtu;
	attr->active_mtu = r.active_mtu;
	attr->phys_mtu = ib_mtu_enum_to_int(r.max_mtu);
	attr->phys_state = r.phys_state;
	attr->gid_tbl_len = dev->gid_tbl_len;
	attr->port_cap_flags = le32_to_cpu(r.port_cap_flags);
	attr->max_msg_sz = le32_to_cpu(r.max_msg_sz);
	attr->pkey_tbl_len = le16_to_cpu(r.pkey_tbl_len);
	attr->active_speed = le16_to_cpu(r.active_speed);
	attr->active_width = r.active_width;
	return 0;
}

static int vrdma_query_port(struct ib_device *ib, u32 port,
			    struct ib_port_attr *attr)
{
	return vrdma_query_port_cmd(to_vdev(ib), port, attr);
}

static int vrdma_get_port_immutable(struct ib_device *ib, u32 port,
				    struct ib_port_immutable *imm)
{
	struct ib_port_attr attr = {};
	int err;

	err = vrdma_query_port_cmd(to_vdev(ib), port, &attr);
	if (err)
		return err;
	imm->pkey_tbl_len = attr.pkey_tbl_len;
	imm->gid_tbl_len = attr.gid_tbl_len;
	/* no MADs: the device has no QP0/QP1 (CREATE_QP refuses GSI) */
	imm->core_cap_flags = RDMA_CORE_CAP_PROT_IB | RDMA_CORE_CAP_IB_GRH_REQUIRED;
	imm->max_mad_size = 0;
	return 0;
}

static enum rdma_link_layer vrdma_get_link_layer(struct ib_device *ib, u32 port)
{
	return IB_LINK_LAYER_ETHERNET;
}

static int vrdma_query_gid(struct ib_device *ib, u32 port, int index,
			   union ib_gid *gid)
{
	struct vrdma_dev *dev = to_vdev(ib);
	struct vrdma_query_index req = {
		.port = cpu_to_le32(port),
		.index = cpu_to_le32(index),
	};
	struct vrdma_query_gid_resp r;
	int err;

	if (index < 0 || index >= dev->gid_tbl_len)
		return -EINVAL;
	err = vrdma_exec(dev, VRDMA_CMD_QUERY_GID, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	memcpy(gid->raw, r.gid, sizeof(gid->raw));
	return 0;
}

static int vrdma_query_pkey(struct ib_device *ib, u32 port, u16 index, u16 *pkey)
{
	struct vrdma_query_index req = {
		.port = cpu_to_le32(port),
		.index = cpu_to_le32(index),
	};
	struct vrdma_query_pkey_resp r;
	int err;

	err = vrdma_exec(to_vdev(ib), VRDMA_CMD_QUERY_PKEY, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	*pkey = le16_to_cpu(r.pkey);
	return 0;
}

static int vrdma_alloc_ucontext(struct ib_ucontext *uctx, struct ib_udata *udata)
{
	return 0;
}

static void vrdma_dealloc_ucontext(struct ib_ucontext *uctx)
{
}

/* nothing is mapped into user space, so nothing has to be zapped */
static void vrdma_disassociate_ucontext(struct ib_ucontext *uctx)
{
}

static void vrdma_get_fw_str(struct ib_device *ib, char *str)
{
	u64 fw = to_vdev(ib)->attrs.fw_ver;

	snprintf(str, IB_FW_VERSION_NAME_MAX, "%llu.%llu.%llu", fw >> 32,
		 (fw >> 16) & 0xffff, fw & 0xffff);
}

static const struct ib_device_ops vrdma_dev_ops = {
	.owner = THIS_MODULE,
	.driver_id = RDMA_DRIVER_UNKNOWN,
	.uverbs_abi_ver = VRDMA_UVERBS_ABI_VERSION,

	.alloc_pd = vrdma_alloc_pd,
	.alloc_ucontext = vrdma_alloc_ucontext,
	.create_ah = vrdma_create_ah,
	.create_cq = vrdma_create_cq,
	.create_qp = vrdma_create_qp,
	.create_user_ah = vrdma_create_ah,
	.dealloc_pd = vrdma_dealloc_pd,
	.dealloc_ucontext = vrdma_dealloc_ucontext,
	.dereg_mr = vrdma_dereg_mr,
	.destroy_ah = vrdma_destroy_ah,
	.destroy_cq = vrdma_destroy_cq,
	.destroy_qp = vrdma_destroy_qp,
	.disassociate_ucontext = vrdma_disassociate_ucontext,
	.get_dev_fw_str = vrdma_get_fw_str,
	.get_dma_mr = vrdma_get_dma_mr,
	.get_link_layer = vrdma_get_link_layer,
	.get_port_immutable = vrdma_get_port_immutable,
	.modify_qp = vrdma_modify_qp,
	.poll_cq = vrdma_poll_cq,
	.post_recv = vrdma_post_recv,
	.post_send = vrdma_post_send,
	.query_device = vrdma_query_device,
	.query_gid = vrdma_query_gid,
	.query_pkey = vrdma_query_pkey,
	.query_port = vrdma_query_port,
	.query_qp = vrdma_query_qp,
	.reg_user_mr = vrdma_reg_user_mr,
	.req_notify_cq = vrdma_req_notify_cq,

	INIT_RDMA_OBJ_SIZE(ib_ah, vrdma_ah, ibah),
	INIT_RDMA_OBJ_SIZE(ib_cq, vrdma_cq, ibcq),
	INIT_RDMA_OBJ_SIZE(ib_pd, vrdma_pd, ibpd),
	INIT_RDMA_OBJ_SIZE(ib_qp, vrdma_qp, ibqp),
	INIT_RDMA_OBJ_SIZE(ib_ucontext, vrdma_ucontext, ibuc),
};

/*
 * QUERY_DEVICE may not promise more than the config space (and the slot
 * pools) allow, and we size allocations by what it says.
 */
static int vrdma_load_attrs(struct vrdma_dev *dev)
{
	struct virtio_device *vdev = dev->vdev;
	struct ib_device_attr *a = &dev->attrs;
	struct vrdma_query_device_resp r;
	u32 cfg_max_sge, cfg_max_inline;
	int err;

	err = vrdma_exec(dev, VRDMA_CMD_QUERY_DEVICE, NULL, 0, &r, sizeof(r));
	if (err)
		return err;
	virtio_cread_le(vdev, struct vrdma_config, max_sge, &cfg_max_sge);
	virtio_cread_le(vdev, struct vrdma_config, max_inline_data, &cfg_max_inline);

	memset(a, 0, sizeof(*a));
	a->fw_ver = le64_to_cpu(r.fw_ver);
	a->sys_image_guid = cpu_to_be64(le64_to_cpu(r.sys_image_guid));
	a->max_mr_size = min_t(u64, le64_to_cpu(r.max_mr_size),
			       (u64)VRDMA_MAX_MR_PAGES * VRDMA_PAGE_SIZE);
	a->page_size_cap = VRDMA_PAGE_SIZE;
	a->vendor_id = le32_to_cpu(r.vendor_id);
	a->vendor_part_id = le32_to_cpu(r.vendor_part_id);
	a->hw_ver = le32_to_cpu(r.hw_ver);
	a->max_qp = min_t(u32, clamp_le32(r.max_qp), dev->num_qp_slots);
	a->max_qp_wr = min_t(u32, clamp_le32(r.max_qp_wr), dev->qp_ring_min);
	a->device_cap_flags = le64_to_cpu(r.device_cap_flags) &
			      (IB_DEVICE_RC_RNR_NAK_GEN | IB_DEVICE_SYS_IMAGE_GUID);
	a->max_send_sge = min3(clamp_le32(r.max_send_sge), cfg_max_sge, (u32)VRDMA_SANE_MAX_SGE);
	a->max_recv_sge = min3(clamp_le32(r.max_recv_sge), cfg_max_sge, (u32)VRDMA_SANE_MAX_SGE);
	a->max_sge_rd = min_t(u32, clamp_le32(r.max_sge_rd), a->max_send_sge);
	a->max_cq = min_t(u32, clamp_le32(r.max_cq), dev->num_cq_slots);
	/* one CQ ring entry stays in reserve (overflow rule) */
	a->max_cqe = min_t(u32, clamp_le32(r.max_cqe), dev->cq_ring_min - 1);
	a->max_mr = clamp_le32(r.max_mr);
	a->max_pd = clamp_le32(r.max_pd);
	a->max_qp_rd_atom = clamp_le32(r.max_qp_rd_atom);
	a->max_qp_init_rd_atom = clamp_le32(r.max_qp_init_rd_atom);
	a->max_res_rd_atom = a->max_qp_rd_atom * a->max_qp;
	a->max_ah = clamp_le32(r.max_ah);
	a->max_pkeys = le16_to_cpu(r.max_pkeys);
	a->atomic_cap = r.atomic_cap <= IB_ATOMIC_GLOB ? r.atomic_cap : IB_ATOMIC_NONE;
	a->local_ca_ack_delay = r.local_ca_ack_delay;
	dev->max_inline_data = min3(clamp_le32(r.max_inline_data), cfg_max_inline,
				    (u32)VRDMA_SANE_MAX_INLINE);

	if (!a->max_qp || !a->max_cq || !a->max_qp_wr || !a->max_cqe ||
	    !a->max_send_sge || !a->max_recv_sge || !a->max_pd) {
		dev_err(&vdev->dev, "QUERY_DEVICE: unusable limits (qp %d, cq %d, wr %d, cqe %d, sge %d/%d, pd %d)\n",
			a->max_qp, a->max_cq, a->max_qp_wr, a->max_cqe,
			a->max_send_sge, a->max_recv_sge, a->max_pd);
		return -EPROTO;
	}
	dev->ib.node_guid = cpu_to_be64(le64_to_cpu(r.node_guid));
	return 0;
}

/*
 * SQ/RQ rings need no callback: the chains the device returns are
 * reclaimed when the next WQE is posted.
 */
static vq_callback_t *vrdma_vq_callback(struct vrdma_dev *dev, unsigned int i)
{
	if (i == 0)
		return vrdma_ctrl_done;
	return i <= dev->num_cq_slots ? vrdma_cq_done : NULL;
}

/* every ring needs a name: a NULL one would skip the queue */
static const char *vrdma_vq_name(struct vrdma_dev *dev, unsigned int i)
{
	if (i == 0)
		return "ctrl";
	if (i <= dev->num_cq_slots)
		return "cq";
	return (i - 1 - dev->num_cq_slots) % 2 ? "rq" : "sq";
}

#if VRDMA_HAVE_VQS_INFO
static int vrdma_find_all_vqs(struct vrdma_dev *dev)
{
	struct virtqueue_info *info;
	unsigned int i;
	int err;

	info = kcalloc(dev->nvqs, sizeof(*info), GFP_KERNEL);
	if (!info)
		return -ENOMEM;
	for (i = 0; i < dev->nvqs; i++) {
		info[i].name = vrdma_vq_name(dev, i);
		info[i].callback = vrdma_vq_callback(dev, i);
	}
	err = virtio_find_vqs(dev->vdev, dev->nvqs, dev->vqs, info, NULL);
	kfree(info);
	return err;
}
#else
static int vrdma_find_all_vqs(struct vrdma_dev *dev)
{
	vq_callback_t **callbacks;
	const char **names;
	unsigned int i;
	int err = -ENOMEM;

	callbacks = kcalloc(dev->nvqs, sizeof(*callbacks), GFP_KERNEL);
	names = kcalloc(dev->nvqs, sizeof(*names), GFP_KERNEL);
	if (callbacks && names) {
		for (i = 0; i < dev->nvqs; i++) {
			names[i] = vrdma_vq_name(dev, i);
			callbacks[i] = vrdma_vq_callback(dev, i);
		}
		err = virtio_find_vqs(dev->vdev, dev->nvqs, dev->vqs, callbacks, names, NULL);
	}
	kfree(callbacks);
	kfree(names);
	return err;
}
#endif

static int vrdma_find_vqs(struct vrdma_dev *dev)
{
	unsigned int i, c = dev->num_cq_slots, sz;
	int err;

	err = vrdma_find_all_vqs(dev);
	if (err)
		return err;

	dev->cq_ring_min = UINT_MAX;
	dev->qp_ring_min = UINT_MAX;
	for (i = 1; i < dev->nvqs; i++) {
		sz = virtqueue_get_vring_size(dev->vqs[i]);
		if (i <= c)
			dev->cq_ring_min = min(dev->cq_ring_min, sz);
		else
			dev->qp_ring_min = min(dev->qp_ring_min, sz);
	}
	if (dev->cq_ring_min < 2 || dev->qp_ring_min < 1) {
		dev_err(&dev->vdev->dev, "rings too small (cq %u, qp %u)\n",
			dev->cq_ring_min, dev->qp_ring_min);
		dev->vdev->config->del_vqs(dev->vdev);
		return -ENODEV;
	}
	return 0;
}

static void vrdma_free_tables(struct vrdma_dev *dev)
{
	kfree(dev->vqs);
	kfree(dev->cq_of_slot);
	kfree(dev->qp_of_slot);
	bitmap_free(dev->cq_slot_poisoned);
	bitmap_free(dev->qp_slot_poisoned);
}

/* after the reset the device touches no ring and no buffer */
static void vrdma_reset(struct vrdma_dev *dev)
{
	struct virtio_device *vdev = dev->vdev;
	unsigned long flags;
	void *buf;

	spin_lock_irqsave(&dev->ctrl_lock, flags);
	dev->broken = true;
	spin_unlock_irqrestore(&dev->ctrl_lock, flags);
	virtio_reset_device(vdev);
	/* only abandoned commands can be left on the control queue */
	while ((buf = virtqueue_detach_unused_buf(dev->vqs[0])) != NULL)
		kfree(buf);
	vdev->config->del_vqs(vdev);
}

static int vrdma_probe(struct virtio_device *vdev)
{
	struct vrdma_dev *dev;
	u32 abi;
	u16 c, q, gids;
	u8 ports;
	int err;

	virtio_cread_le(vdev, struct vrdma_config, abi_version, &abi);
	virtio_cread_le(vdev, struct vrdma_config, num_cq_slots, &c);
	virtio_cread_le(vdev, struct vrdma_config, num_qp_slots, &q);
	virtio_cread_le(vdev, struct vrdma_config, gid_tbl_len, &gids);
	virtio_cread_le(vdev, struct vrdma_config, phys_port_cnt, &ports);
	if (abi != VRDMA_ABI_VERSION) {
		dev_err(&vdev->dev, "device ABI version %u, driver speaks %u\n", abi, VRDMA_ABI_VERSION);
		return -ENODEV;
	}
	if (!c || !q || 1 + c + 2 * (unsigned int)q > VRDMA_MAX_VQS || !gids || gids > 256 ||
	    ports != 1) {
		dev_err(&vdev->dev, "impossible config: %u CQ slots, %u QP slots, %u GIDs, %u ports\n",
			c, q, gids, ports);
		return -ENODEV;
	}

	dev = ib_alloc_device(vrdma_dev, ib);
	if (!dev)
		return -ENOMEM;
	dev->vdev = vdev;
	dev->num_cq_slots = c;
	dev->num_qp_slots = q;
	dev->gid_tbl_len = gids;
	dev->nvqs = 1 + c + 2 * q;
	spin_lock_init(&dev->ctrl_lock);
	mutex_init(&dev->ctrl_mutex);
	spin_lock_init(&dev->slot_lock);
	xa_init_flags(&dev->qps, XA_FLAGS_LOCK_IRQ);

	err = -ENOMEM;
	dev->vqs = kcalloc(dev->nvqs, sizeof(*dev->vqs), GFP_KERNEL);
	dev->cq_of_slot = kcalloc(c, sizeof(*dev->cq_of_slot), GFP_KERNEL);
	dev->qp_of_slot = kcalloc(q, sizeof(*dev->qp_of_slot), GFP_KERNEL);
	dev->cq_slot_poisoned = bitmap_zalloc(c, GFP_KERNEL);
	dev->qp_slot_poisoned = bitmap_zalloc(q, GFP_KERNEL);
	if (!dev->vqs || !dev->cq_of_slot || !dev->qp_of_slot ||
	    !dev->cq_slot_poisoned || !dev->qp_slot_poisoned)
		goto err_free;

	err = vrdma_find_vqs(dev);
	if (err) {
		dev_err(&vdev->dev, "setting up %u virtqueues failed: %d\n", dev->nvqs, err);
		goto err_free;
	}
	vdev->priv = dev;
	virtio_device_ready(vdev);

	err = vrdma_load_attrs(dev);
	if (err)
		goto err_reset;

	/* user space (rdma-core) matches its provider by this device's modalias */
	dev->ib.dev.parent = &vdev->dev;
	dev->ib.node_type = RDMA_NODE_IB_CA;
	dev->ib.phys_port_cnt = 1;
	dev->ib.num_comp_vectors = 1;
	strscpy(dev->ib.node_desc, "vrdma virtio-rdma", sizeof(dev->ib.node_desc));
	dev->ib.uverbs_cmd_mask |= BIT_ULL(IB_USER_VERBS_CMD_POST_SEND) |
				   BIT_ULL(IB_USER_VERBS_CMD_POST_RECV) |
				   BIT_ULL(IB_USER_VERBS_CMD_POLL_CQ) |
				   BIT_ULL(IB_USER_VERBS_CMD_REQ_NOTIFY_CQ);
	ib_set_device_ops(&dev->ib, &vrdma_dev_ops);

	err = ib_register_device(&dev->ib, "virtio_rdma%d", vdev->dev.parent);
	if (err) {
		dev_err(&vdev->dev, "ib_register_device failed: %d\n", err);
		goto err_reset;
	}
	dev_info(&vdev->dev, "%s: %u CQ slots, %u QP slots, %u GIDs, rings cq %u qp %u%s\n",
		 dev_name(&dev->ib.dev), c, q, gids, dev->cq_ring_min, dev->qp_ring_min,
		 virtio_has_feature(vdev, VIRTIO_RDMA_F_IB_GRH) ? "" :
		 "; the device lacks VIRTIO_RDMA_F_IB_GRH: UD GRHs from IPv4 GIDs will not parse as IB GRHs");
	return 0;

err_reset:
	vrdma_reset(dev);
	vdev->priv = NULL;
err_free:
	vrdma_free_tables(dev);
	ib_dealloc_device(&dev->ib);
	return err;
}

static void vrdma_remove(struct virtio_device *vdev)
{
	struct vrdma_dev *dev = vdev->priv;

	/* destroys every object still open (user contexts are disassociated) */
	ib_unregister_device(&dev->ib);
	vrdma_reset(dev);
	vdev->priv = NULL;
	WARN_ON(!xa_empty(&dev->qps));
	xa_destroy(&dev->qps);
	vrdma_free_tables(dev);
	ib_dealloc_device(&dev->ib);
	dev_info(&vdev->dev, "removed (device reset)\n");
}

static const struct virtio_device_id vrdma_id_table[] = {
	{ VIRTIO_ID_RDMA_DEV, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vrdma_id_table);

static unsigned int vrdma_features[] = { VIRTIO_RDMA_F_IB_GRH };

static struct virtio_driver vrdma_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.feature_table = vrdma_features,
	.feature_table_size = ARRAY_SIZE(vrdma_features),
	.id_table = vrdma_id_table,
	.probe = vrdma_probe,
	.remove = vrdma_remove,
};
module_virtio_driver(vrdma_driver);

MODULE_DESCRIPTION("RDMA driver for the vrdma virtio-rdma device");
MODULE_LICENSE("GPL");

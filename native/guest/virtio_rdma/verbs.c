// SPDX-License-Identifier: GPL-2.0
/*
 * Protection domains, memory regions and address handles.
 */
#include <linux/mm.h>
#include <linux/slab.h>
#include <rdma/ib_umem.h>

#include "virtio_rdma.h"

#define VRDMA_ACCESS_ALL	(IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE | \
				 IB_ACCESS_REMOTE_READ | IB_ACCESS_REMOTE_ATOMIC)

int vrdma_alloc_pd(struct ib_pd *ibpd, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibpd->device);
	struct vrdma_pd *pd = to_vpd(ibpd);
	struct vrdma_create_pd_resp r;
	int err;

	err = vrdma_exec(dev, VRDMA_CMD_CREATE_PD, NULL, 0, &r, sizeof(r));
	if (err)
		return err;
	pd->pdn = le32_to_cpu(r.pdn);
	if (!pd->pdn) {
		dev_err(&dev->vdev->dev, "CREATE_PD: device returned handle 0\n");
		return -EPROTO;
	}
	return 0;
}

/*
 * Destroys report failure only when the object is really still in use:
 * for a device that does not answer, or no longer knows the handle, the
 * object is gone as far as the core is concerned (the core would
 * otherwise keep retrying, or warn, while unregistering).
 */
static int vrdma_destroy_done(struct vrdma_dev *dev, const char *what, u32 handle, int err)
{
	if (err == -EBUSY)
		return err;
	if (err)
		dev_warn_ratelimited(&dev->vdev->dev, "destroying %s %u: %d; forgotten\n",
				     what, handle, err);
	return 0;
}

int vrdma_dealloc_pd(struct ib_pd *ibpd, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibpd->device);
	u32 pdn = to_vpd(ibpd)->pdn;

	return vrdma_destroy_done(dev, "pdn", pdn,
				  vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_PD, pdn, true));
}

/* IB access bits 0..3 are the ABI's; optional hints are not forwarded */
static int vrdma_access(int access, u32 *out)
{
	access &= ~IB_ACCESS_OPTIONAL;
	if (access & ~VRDMA_ACCESS_ALL)
		return -EOPNOTSUPP;
	*out = access;
	return 0;
}

static int vrdma_mr_done(struct vrdma_dev *dev, struct vrdma_mr *mr,
			 const struct vrdma_mr_resp *r)
{
	mr->mrn = le32_to_cpu(r->mrn);
	mr->ibmr.lkey = le32_to_cpu(r->lkey);
	mr->ibmr.rkey = le32_to_cpu(r->rkey);
	/* keys are (mrn << 8) | key: a mismatch means the device lost track */
	if (!mr->mrn || mr->ibmr.lkey >> 8 != mr->mrn || mr->ibmr.rkey >> 8 != mr->mrn) {
		dev_err(&dev->vdev->dev, "MR: device returned mrn %u with lkey 0x%x rkey 0x%x\n",
			mr->mrn, mr->ibmr.lkey, mr->ibmr.rkey);
		if (mr->mrn)
			vrdma_destroy_handle(dev, VRDMA_CMD_DEREG_MR, mr->mrn, true);
		return -EPROTO;
	}
	return 0;
}

struct ib_mr *vrdma_get_dma_mr(struct ib_pd *ibpd, int access)
{
	struct vrdma_dev *dev = to_vdev(ibpd->device);
	struct vrdma_get_dma_mr req = { .pdn = cpu_to_le32(to_vpd(ibpd)->pdn) };
	struct vrdma_mr_resp r;
	struct vrdma_mr *mr;
	u32 acc;
	int err;

	err = vrdma_access(access, &acc);
	if (err)
		return ERR_PTR(err);
	/* the device grants remote access only inside registered MRs */
	if (acc & ~IB_ACCESS_LOCAL_WRITE)
		return ERR_PTR(-EINVAL);
	req.access = cpu_to_le32(acc);

	mr = kzalloc(sizeof(*mr), GFP_KERNEL);
	if (!mr)
		return ERR_PTR(-ENOMEM);
	err = vrdma_exec(dev, VRDMA_CMD_GET_DMA_MR, &req, sizeof(req), &r, sizeof(r));
	if (!err)
		err = vrdma_mr_done(dev, mr, &r);
	if (err) {
		kfree(mr);
		return ERR_PTR(err);
	}
	return &mr->ibmr;
}

/*
 * The page list the ABI wants: one array of up to 512 page addresses, or a
 * level-1 array of addresses of 512-entry level-2 arrays. Addresses are
 * guest-physical: the device does not negotiate ACCESS_PLATFORM, so (as
 * for the rings) there is no IOMMU between it and guest memory.
 */
struct vrdma_page_list {
	__le64 *l1;
	__le64 **l2;
	unsigned int nl2;
	u64 addr;
};

static void vrdma_free_page_list(struct vrdma_page_list *pl)
{
	unsigned int i;

	if (pl->l2) {
		for (i = 0; i < pl->nl2; i++)
			free_page((unsigned long)pl->l2[i]);
		kfree(pl->l2);
	}
	kfree(pl->l1);
	memset(pl, 0, sizeof(*pl));
}

static int vrdma_build_page_list(struct ib_umem *umem, u32 npages,
				 struct vrdma_page_list *pl)
{
	struct sg_page_iter piter;
	unsigned int i, n = 0;

	memset(pl, 0, sizeof(*pl));
	if (npages <= VRDMA_PAGE_LIST_ENTRIES) {
		pl->l1 = kcalloc(npages, sizeof(__le64), GFP_KERNEL);
		if (!pl->l1)
			return -ENOMEM;
	} else {
		pl->nl2 = DIV_ROUND_UP(npages, VRDMA_PAGE_LIST_ENTRIES);
		pl->l1 = kcalloc(pl->nl2, sizeof(__le64), GFP_KERNEL);
		pl->l2 = kcalloc(pl->nl2, sizeof(*pl->l2), GFP_KERNEL);
		if (!pl->l1 || !pl->l2)
			goto nomem;
		for (i = 0; i < pl->nl2; i++) {
			pl->l2[i] = (__le64 *)get_zeroed_page(GFP_KERNEL);
			if (!pl->l2[i])
				goto nomem;
			pl->l1[i] = cpu_to_le64(virt_to_phys(pl->l2[i]));
		}
	}

	for_each_sgtable_page(&umem->sgt_append.sgt, &piter, 0) {
		u64 pa = page_to_phys(sg_page_iter_page(&piter));

		if (n == npages)
			return -EINVAL;
		if (pl->l2)
			pl->l2[n / VRDMA_PAGE_LIST_ENTRIES][n % VRDMA_PAGE_LIST_ENTRIES] =
				cpu_to_le64(pa);
		else
			pl->l1[n] = cpu_to_le64(pa);
		n++;
	}
	if (n != npages)
		return -EINVAL;
	pl->addr = virt_to_phys(pl->l1);
	return 0;

nomem:
	return -ENOMEM;
}

struct ib_mr *vrdma_reg_user_mr(struct ib_pd *ibpd, u64 start, u64 length,
				u64 virt_addr, int access,
				struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibpd->device);
	struct vrdma_reg_mr req = {};
	struct vrdma_page_list pl = {};
	struct vrdma_mr_resp r;
	struct vrdma_mr *mr;
	u64 npages;
	u32 acc;
	int err;

	/* this driver is built for 4 KiB pages, the ABI's page size */
	BUILD_BUG_ON(PAGE_SIZE != VRDMA_PAGE_SIZE);
	err = vrdma_access(access, &acc);
	if (err)
		return ERR_PTR(err);
	if (!length || length > dev->attrs.max_mr_size || virt_addr + length < virt_addr)
		return ERR_PTR(-EINVAL);
	/* page i of the list holds iova page i: the offsets must agree */
	if ((start ^ virt_addr) & (VRDMA_PAGE_SIZE - 1))
		return ERR_PTR(-EINVAL);
	npages = DIV_ROUND_UP((virt_addr & (VRDMA_PAGE_SIZE - 1)) + length, VRDMA_PAGE_SIZE);
	if (npages > VRDMA_MAX_MR_PAGES)
		return ERR_PTR(-EINVAL);

	mr = kzalloc(sizeof(*mr), GFP_KERNEL);
	if (!mr)
		return ERR_PTR(-ENOMEM);
	mr->umem = ib_umem_get(ibpd->device, start, length, access);
	if (IS_ERR(mr->umem)) {
		err = PTR_ERR(mr->umem);
		goto err_free;
	}
	err = vrdma_build_page_list(mr->umem, npages, &pl);
	if (err)
		goto err_umem;

	req.pdn = cpu_to_le32(to_vpd(ibpd)->pdn);
	req.access = cpu_to_le32(acc);
	req.iova = cpu_to_le64(virt_addr);
	req.length = cpu_to_le64(length);
	req.page_list = cpu_to_le64(pl.addr);
	req.npages = cpu_to_le32(npages);
	err = vrdma_exec(dev, VRDMA_CMD_REG_MR, &req, sizeof(req), &r, sizeof(r));
	/* the device copied the list; its pages are ours again */
	vrdma_free_page_list(&pl);
	if (!err)
		err = vrdma_mr_done(dev, mr, &r);
	if (err)
		goto err_umem;
	mr->ibmr.length = length;
	mr->ibmr.iova = virt_addr;
	return &mr->ibmr;

err_umem:
	vrdma_free_page_list(&pl);
	ib_umem_release(mr->umem);
err_free:
	kfree(mr);
	return ERR_PTR(err);
}

int vrdma_dereg_mr(struct ib_mr *ibmr, struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibmr->device);
	struct vrdma_mr *mr = to_vmr(ibmr);
	u32 mrn = mr->mrn;
	int err;

	err = vrdma_destroy_handle(dev, VRDMA_CMD_DEREG_MR, mrn, true);
	/*
	 * Without the device's word the pages may still be written: keep them
	 * pinned (leaked) rather than hand them back to the allocator.
	 */
	if (!vrdma_no_answer(err)) {
		ib_umem_release(mr->umem);
		kfree(mr);
	}
	return vrdma_destroy_done(dev, "mrn", mrn, err);
}

int vrdma_fill_ah_attr(struct vrdma_dev *dev, const struct rdma_ah_attr *src,
		       struct vrdma_ah_attr *dst)
{
	const struct ib_global_route *grh;

	/* the device routes by GID only (RoCEv2): every AV carries a GRH */
	if (!(rdma_ah_get_ah_flags(src) & IB_AH_GRH))
		return -EINVAL;
	grh = rdma_ah_read_grh(src);
	if (grh->sgid_index >= dev->gid_tbl_len)
		return -EINVAL;
	memset(dst, 0, sizeof(*dst));
	memcpy(dst->dgid, grh->dgid.raw, sizeof(dst->dgid));
	dst->flow_label = cpu_to_le32(grh->flow_label);
	dst->sgid_index = grh->sgid_index;
	dst->hop_limit = grh->hop_limit;
	dst->traffic_class = grh->traffic_class;
	dst->sl = rdma_ah_get_sl(src);
	dst->port_num = rdma_ah_get_port_num(src);
	dst->static_rate = rdma_ah_get_static_rate(src);
	return 0;
}

int vrdma_create_ah(struct ib_ah *ibah, struct rdma_ah_init_attr *init,
		    struct ib_udata *udata)
{
	struct vrdma_dev *dev = to_vdev(ibah->device);
	struct vrdma_create_ah req = { .pdn = cpu_to_le32(to_vpd(ibah->pd)->pdn) };
	struct vrdma_create_ah_resp r;
	struct vrdma_ah *ah = to_vah(ibah);
	int err;

	err = vrdma_fill_ah_attr(dev, init->ah_attr, &req.ah);
	if (err)
		return err;
	if (init->flags & RDMA_CREATE_AH_SLEEPABLE)
		err = vrdma_exec(dev, VRDMA_CMD_CREATE_AH, &req, sizeof(req), &r, sizeof(r));
	else
		err = vrdma_exec_atomic(dev, VRDMA_CMD_CREATE_AH, &req, sizeof(req), &r, sizeof(r));
	if (err)
		return err;
	ah->ahn = le32_to_cpu(r.ahn);
	if (!ah->ahn) {
		dev_err(&dev->vdev->dev, "CREATE_AH: device returned handle 0\n");
		return -EPROTO;
	}
	return 0;
}

int vrdma_destroy_ah(struct ib_ah *ibah, u32 flags)
{
	struct vrdma_dev *dev = to_vdev(ibah->device);
	u32 ahn = to_vah(ibah)->ahn;

	return vrdma_destroy_done(dev, "ahn", ahn,
				  vrdma_destroy_handle(dev, VRDMA_CMD_DESTROY_AH, ahn,
						       flags & RDMA_DESTROY_AH_SLEEPABLE));
}

// SPDX-License-Identifier: GPL-2.0
/*
 * Control queue: one descriptor chain per command, answered in order by
 * the device. Most commands may sleep; REQ_NOTIFY_CQ and non-sleepable
 * AH commands are issued from atomic context, so a waiter can also spin
 * and reap the queue itself (its interrupt may be masked on this CPU).
 */
#include <linux/delay.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>

#include "virtio_rdma.h"

static unsigned int cmd_timeout_ms = 10000;
module_param(cmd_timeout_ms, uint, 0644);
MODULE_PARM_DESC(cmd_timeout_ms, "control command deadline in ms (default 10000)");

#define VRDMA_REQ_MAX	80	/* MODIFY_QP, the longest request, is 72 */
#define VRDMA_RESP_MAX	128	/* QUERY_DEVICE, the longest response, is 120 */

struct vrdma_ctrl_cmd {
	struct {
		struct vrdma_ctrl_hdr hdr;
		u8 req[VRDMA_REQ_MAX];
	} out;
	/* the device writes here: keep it off the cache line it reads */
	struct {
		struct vrdma_ctrl_status status;
		u8 resp[VRDMA_RESP_MAX];
	} in ____cacheline_aligned;
	struct completion done;
	unsigned int used_len;
	bool finished;
	bool abandoned;		/* the waiter gave up; the reaper frees it */
};

/* called with ctrl_lock held */
static void vrdma_ctrl_reap(struct vrdma_dev *dev)
{
	struct virtqueue *vq = dev->vqs[0];
	struct vrdma_ctrl_cmd *c;
	unsigned int len;

	while ((c = virtqueue_get_buf(vq, &len)) != NULL) {
		c->used_len = len;
		WRITE_ONCE(c->finished, true);
		if (c->abandoned)
			kfree(c);
		else
			complete(&c->done);
	}
}

void vrdma_ctrl_done(struct virtqueue *vq)
{
	struct vrdma_dev *dev = vq->vdev->priv;
	unsigned long flags;

	if (!dev)
		return;
	spin_lock_irqsave(&dev->ctrl_lock, flags);
	vrdma_ctrl_reap(dev);
	spin_unlock_irqrestore(&dev->ctrl_lock, flags);
}

static int vrdma_ctrl_submit(struct vrdma_dev *dev, struct vrdma_ctrl_cmd *c,
			     size_t req_len, size_t resp_len, bool can_sleep)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	ktime_t deadline = ktime_add_ms(ktime_get(), cmd_timeout_ms);
	unsigned long flags;
	int err;

	sg_init_one(&out, &c->out, sizeof(c->out.hdr) + req_len);
	sg_init_one(&in, &c->in, sizeof(c->in.status) + resp_len);
	for (;;) {
		spin_lock_irqsave(&dev->ctrl_lock, flags);
		if (dev->broken) {
			err = -EIO;
		} else {
			err = virtqueue_add_sgs(dev->vqs[0], sgs, 1, 1, c, GFP_ATOMIC);
			if (!err && !virtqueue_kick(dev->vqs[0])) {
				/* the chain is queued: it belongs to the ring now */
				c->abandoned = true;
				dev->broken = true;
				err = -EIO;
			}
			if (err == -ENOSPC)
				vrdma_ctrl_reap(dev);
		}
		spin_unlock_irqrestore(&dev->ctrl_lock, flags);
		if (err != -ENOSPC)
			return err;
		if (ktime_after(ktime_get(), deadline))
			return -ETIMEDOUT;
		if (can_sleep)
			usleep_range(50, 200);
		else
			udelay(5);
	}
}

/* 0 once the device answered, or -ETIMEDOUT; the command is then abandoned */
static int vrdma_ctrl_wait(struct vrdma_dev *dev, struct vrdma_ctrl_cmd *c,
			   bool can_sleep)
{
	ktime_t deadline = ktime_add_ms(ktime_get(), cmd_timeout_ms);
	unsigned long flags;
	bool timed_out = false;

	if (can_sleep) {
		if (!wait_for_completion_timeout(&c->done, msecs_to_jiffies(cmd_timeout_ms)))
			timed_out = true;
	} else {
		for (;;) {
			spin_lock_irqsave(&dev->ctrl_lock, flags);
			vrdma_ctrl_reap(dev);
			spin_unlock_irqrestore(&dev->ctrl_lock, flags);
			if (READ_ONCE(c->finished))
				break;
			if (ktime_after(ktime_get(), deadline)) {
				timed_out = true;
				break;
			}
			udelay(2);
		}
	}
	if (!timed_out)
		return 0;

	spin_lock_irqsave(&dev->ctrl_lock, flags);
	if (c->finished) {
		spin_unlock_irqrestore(&dev->ctrl_lock, flags);
		return 0;
	}
	c->abandoned = true;
	dev->broken = true;
	spin_unlock_irqrestore(&dev->ctrl_lock, flags);
	dev_err(&dev->vdev->dev, "command %u: no answer within %u ms; control queue disabled until reset\n",
		le32_to_cpu(c->out.hdr.cmd), cmd_timeout_ms);
	return -ETIMEDOUT;
}

/*
 * The device answers with used length 8 + sizeof(response) and status 0,
 * or 8 and an errno value. Anything else is a device bug, not a result.
 */
static int vrdma_ctrl_result(struct vrdma_dev *dev, struct vrdma_ctrl_cmd *c,
			     void *resp, size_t resp_len)
{
	u32 cmd = le32_to_cpu(c->out.hdr.cmd);
	u32 st = le32_to_cpu(c->in.status.status);
	unsigned int len = c->used_len;

	if (st > MAX_ERRNO) {
		dev_err_ratelimited(&dev->vdev->dev, "command %u: status %u is not an errno value\n",
				    cmd, st);
		return -EPROTO;
	}
	if (st) {
		if (len != sizeof(c->in.status)) {
			dev_err_ratelimited(&dev->vdev->dev, "command %u: status %u with used length %u\n",
					    cmd, st, len);
			return -EPROTO;
		}
		return -(int)st;
	}
	if (len != sizeof(c->in.status) + resp_len) {
		dev_err_ratelimited(&dev->vdev->dev, "command %u: used length %u, expected %zu\n",
				    cmd, len, sizeof(c->in.status) + resp_len);
		return -EPROTO;
	}
	if (resp_len)
		memcpy(resp, c->in.resp, resp_len);
	return 0;
}

static int __vrdma_exec(struct vrdma_dev *dev, u32 cmd, const void *req,
			size_t req_len, void *resp, size_t resp_len,
			bool can_sleep)
{
	struct vrdma_ctrl_cmd *c;
	int err;

	if (WARN_ON(req_len > VRDMA_REQ_MAX || resp_len > VRDMA_RESP_MAX))
		return -EINVAL;
	c = kzalloc(sizeof(*c), can_sleep ? GFP_KERNEL : GFP_ATOMIC);
	if (!c)
		return -ENOMEM;
	init_completion(&c->done);
	c->out.hdr.cmd = cpu_to_le32(cmd);
	if (req_len)
		memcpy(c->out.req, req, req_len);
	/* never a valid status: a device that writes nothing is caught */
	c->in.status.status = cpu_to_le32(U32_MAX);

	err = vrdma_ctrl_submit(dev, c, req_len, resp_len, can_sleep);
	if (err) {
		if (!c->abandoned)
			kfree(c);
		return err;
	}
	err = vrdma_ctrl_wait(dev, c, can_sleep);
	if (err)
		return err;	/* abandoned: freed when (if) the device returns it */
	err = vrdma_ctrl_result(dev, c, resp, resp_len);
	kfree(c);
	return err;
}

int vrdma_exec(struct vrdma_dev *dev, u32 cmd, const void *req, size_t req_len,
	       void *resp, size_t resp_len)
{
	int err;

	might_sleep();
	mutex_lock(&dev->ctrl_mutex);
	err = __vrdma_exec(dev, cmd, req, req_len, resp, resp_len, true);
	mutex_unlock(&dev->ctrl_mutex);
	return err;
}

int vrdma_exec_atomic(struct vrdma_dev *dev, u32 cmd, const void *req,
		      size_t req_len, void *resp, size_t resp_len)
{
	return __vrdma_exec(dev, cmd, req, req_len, resp, resp_len, false);
}

int vrdma_destroy_handle(struct vrdma_dev *dev, u32 cmd, u32 handle,
			 bool can_sleep)
{
	struct vrdma_handle req = { .handle = cpu_to_le32(handle) };

	if (can_sleep)
		return vrdma_exec(dev, cmd, &req, sizeof(req), NULL, 0);
	return vrdma_exec_atomic(dev, cmd, &req, sizeof(req), NULL, 0);
}

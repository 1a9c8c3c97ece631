// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_rdma_probe - a minimal guest-side probe for the vrdma virtio-rdma
 * device (virtio ID 42, PCI 1af4:106a; ABI in docs/virtio-rdma.md).
 *
 * This is NOT the RDMA driver: it registers nothing with the RDMA core. It
 * exists so VM tests can drive the device's control queue from a real guest
 * kernel through the real virtio core (virtio_pci, virtio_ring):
 *
 *   probe:  read the config space (abi_version, num_cq_slots C, num_qp_slots Q,
 *           ...), set up ALL 1 + C + 2Q virtqueues (no callbacks: nothing here
 *           needs an interrupt, the control queue is polled), DRIVER_OK, then
 *           QUERY_DEVICE. Any failure resets the device and fails the probe.
 *   sysfs:  /sys/bus/virtio/drivers/virtio_rdma_probe/virtioN/
 *             probe_cmd     (write) one command, e.g. "create_cq 15"
 *             probe_result  (read)  the result of the last command, one line
 *             probe_info    (read)  config space, ring sizes, QUERY_DEVICE, live CQs
 *           Commands: query_device | query_port [PORT] | create_pd |
 *             destroy_pd H | create_cq [CQE] | destroy_cq H |
 *             raw CMD [W0 .. W15]   (any control command, request as u32 words)
 *           A write returns the length written once the command ran (whatever
 *           the device answered); it fails only for a malformed command (EINVAL).
 *           Each command prints one dmesg line (status, handles).
 *           probe_result:
 *             cmd=create_cq rc=0 status=0 cqn=1 slot=0 cqe=15
 *             cmd=destroy_pd rc=-2 status=2
 *             cmd=create_pd rc=-110 status=none        (no answer: timeout)
 *           rc is what a driver would return: 0, -status, or a transport error
 *           (-ETIMEDOUT, -EPROTO for a malformed answer, -EIO once broken).
 *   remove: reset the device, reclaim buffers, delete the virtqueues.
 *
 * Everything the device returns is checked before use: the used token, the
 * used length (8 + sizeof(response) on success, exactly 8 on failure), the
 * status (0 or an errno value), non-zero handles, and slot numbers (< C, not
 * already held by another CQ). A command that times out marks the probe
 * broken (its buffer may still be owned by the device) until the device is
 * reset by unbinding/removing the module.
 *
 * Built against Debian bookworm's linux-headers-6.1.0-NN-amd64 by
 * images/guest/probe.sh. Porting to 6.12 (not done here, noted for the real
 * driver):
 *   - virtio_find_vqs() takes `struct virtqueue_info vqs_info[]` ({name,
 *     callback, ctx} per queue) instead of the callbacks[]/names[] arrays
 *     (6.11+), and config->find_vqs() changed the same way; in 6.1 a NULL
 *     name skips a queue, in 6.11+ a NULL .name does.
 *   - virtio_find_single_vq() keeps its shape; virtio_find_vqs_ctx() is gone
 *     (ctx moved into virtqueue_info).
 *   - register_virtio_driver() sets driver.owner itself (6.10+): drop the
 *     .driver.owner initialiser.
 *   - virtqueue_add_sgs/kick/get_buf, virtio_cread_le, virtio_device_ready,
 *     virtio_reset_device (5.17+) and driver.dev_groups are unchanged.
 *   - 6.12's virtio_pci can hand out admin virtqueues and reset individual
 *     queues (VIRTIO_F_RING_RESET); neither matters here.
 */
#include <linux/build_bug.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/err.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#define VIRTIO_ID_RDMA_PROBE 42 /* not in 6.1's virtio_ids.h */
#define VRDMA_ABI_VERSION 1
#define VRDMA_MAX_VQS 1024 /* what a virtio-pci device can have */

static unsigned int cmd_timeout_ms = 5000;
module_param(cmd_timeout_ms, uint, 0644);
MODULE_PARM_DESC(cmd_timeout_ms, "control command deadline in ms (default 5000)");

/* ------------------------------------------------------------------ ABI */

struct vrdma_config {
	__le32 abi_version;
	__le16 num_cq_slots;
	__le16 num_qp_slots;
	__le32 max_pd;
	__le32 max_mr;
	__le32 max_cq;
	__le32 max_qp;
	__le32 max_ah;
	__le32 max_cqe;
	__le32 max_qp_wr;
	__le32 max_sge;
	__le32 max_inline_data;
	__le32 max_qp_rd_atom;
	__le64 max_mr_size;
	__le16 gid_tbl_len;
	__u8 phys_port_cnt;
	__u8 reserved0;
	__le32 reserved1;
	__le64 node_guid;
	__le64 sys_image_guid;
	__u8 reserved[48];
};
static_assert(sizeof(struct vrdma_config) == 128);
static_assert(offsetof(struct vrdma_config, max_mr_size) == 48);
static_assert(offsetof(struct vrdma_config, node_guid) == 64);

enum vrdma_cmd {
	VRDMA_CMD_QUERY_DEVICE = 1,
	VRDMA_CMD_QUERY_PORT = 2,
	VRDMA_CMD_CREATE_PD = 5,
	VRDMA_CMD_DESTROY_PD = 6,
	VRDMA_CMD_CREATE_CQ = 7,
	VRDMA_CMD_DESTROY_CQ = 8,
	VRDMA_CMD_MAX = 18,
};

struct vrdma_ctrl_hdr {
	__le32 cmd;
	__le32 reserved;
};

struct vrdma_ctrl_status {
	__le32 status;
	__le32 reserved;
};

/* DESTROY_*, QUERY_PORT's {port, reserved} has the same shape */
struct vrdma_handle {
	__le32 handle;
	__le32 reserved;
};

struct vrdma_create_pd_resp {
	__le32 pdn;
	__le32 reserved;
};

struct vrdma_create_cq {
	__le32 cqe;
	__le32 reserved;
};

struct vrdma_create_cq_resp {
	__le32 cqn;
	__le32 slot;
	__le32 cqe;
	__le32 reserved;
};

struct vrdma_query_device_resp {
	__le64 fw_ver;
	__le64 node_guid;
	__le64 sys_image_guid;
	__le64 max_mr_size;
	__le64 page_size_cap;
	__le64 device_cap_flags;
	__le32 vendor_id;
	__le32 vendor_part_id;
	__le32 hw_ver;
	__le32 max_qp;
	__le32 max_qp_wr;
	__le32 max_send_sge;
	__le32 max_recv_sge;
	__le32 max_sge_rd;
	__le32 max_cq;
	__le32 max_cqe;
	__le32 max_mr;
	__le32 max_pd;
	__le32 max_qp_rd_atom;
	__le32 max_qp_init_rd_atom;
	__le32 max_ah;
	__le32 max_inline_data;
	__le16 max_pkeys;
	__u8 atomic_cap;
	__u8 local_ca_ack_delay;
	__le32 reserved;
};
static_assert(sizeof(struct vrdma_query_device_resp) == 120);

struct vrdma_query_port_resp {
	__u8 state;
	__u8 max_mtu;
	__u8 active_mtu;
	__u8 phys_state;
	__le32 gid_tbl_len;
	__le32 port_cap_flags;
	__le32 max_msg_sz;
	__le16 pkey_tbl_len;
	__le16 active_speed;
	__u8 active_width;
	__u8 link_layer;
	__le16 reserved;
};
static_assert(sizeof(struct vrdma_query_port_resp) == 24);

#define VRDMA_RAW_WORDS 16
#define VRDMA_REQ_MAX (VRDMA_RAW_WORDS * 4)
#define VRDMA_RESP_MAX 128

/*
 * One control command in flight per device. The device-readable and
 * device-writable parts are in separate cache lines.
 */
struct vrdma_cmd_buf {
	struct {
		struct vrdma_ctrl_hdr hdr;
		u8 req[VRDMA_REQ_MAX];
	} out;
	struct {
		struct vrdma_ctrl_status status;
		u8 resp[VRDMA_RESP_MAX];
	} in ____cacheline_aligned;
};

/* ------------------------------------------------------------------ state */

struct vrdma_probe {
	struct virtio_device *vdev;
	struct virtqueue **vqs; /* 1 + C + 2Q */
	struct virtqueue *ctrl;
	unsigned int nvqs;
	u16 num_cq_slots;
	u16 num_qp_slots;
	u32 abi_version;
	u32 cfg_max_cq, cfg_max_cqe, cfg_max_qp;
	u8 phys_port_cnt;
	u64 node_guid;
	unsigned int ctrl_size, cq_size_min, cq_size_max, qp_size_min, qp_size_max;

	struct mutex lock; /* one command at a time; everything below */
	struct vrdma_cmd_buf *buf;
	bool busy;   /* buf is owned by the device (a command timed out) */
	bool broken; /* no more commands until the device is reset */
	u32 *cq_of_slot; /* [C]: cqn holding each CQ slot, 0 = free */
	struct vrdma_query_device_resp qd;
	unsigned long ncmds;
	char result[256];
};

/*
 * Runs one control command. Returns 0 when the device answered with a
 * well-formed chain (its status in *status, the response copied to resp on
 * status 0), or a negative errno when it did not (-ETIMEDOUT, -EPROTO, -EIO).
 */
static int vrdma_exec(struct vrdma_probe *vp, u32 cmd, const void *req, size_t req_len,
		      void *resp, size_t resp_len, u32 *status, unsigned int *used_len)
{
	struct vrdma_cmd_buf *b = vp->buf;
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	unsigned long deadline;
	unsigned int len = 0;
	void *token;
	u32 st;
	int err;

	lockdep_assert_held(&vp->lock);
	if (vp->broken)
		return -EIO;
	if (WARN_ON(req_len > VRDMA_REQ_MAX || resp_len > VRDMA_RESP_MAX))
		return -EINVAL;

	memset(b, 0, sizeof(*b));
	b->out.hdr.cmd = cpu_to_le32(cmd);
	if (req_len)
		memcpy(b->out.req, req, req_len);
	b->in.status.status = cpu_to_le32(0xffffffff); /* never a valid status */

	sg_init_one(&out, &b->out, sizeof(b->out.hdr) + req_len);
	sg_init_one(&in, &b->in, sizeof(b->in.status) + resp_len);
	err = virtqueue_add_sgs(vp->ctrl, sgs, 1, 1, b, GFP_KERNEL);
	if (err) {
		dev_err(&vp->vdev->dev, "cmd %u: virtqueue_add_sgs failed: %d\n", cmd, err);
		return err;
	}
	vp->busy = true;
	if (!virtqueue_kick(vp->ctrl)) {
		dev_err(&vp->vdev->dev, "cmd %u: kick failed, control queue broken\n", cmd);
		vp->broken = true;
		return -EIO;
	}

	deadline = jiffies + msecs_to_jiffies(cmd_timeout_ms);
	for (;;) {
		token = virtqueue_get_buf(vp->ctrl, &len);
		if (token)
			break;
		if (virtqueue_is_broken(vp->ctrl)) {
			dev_err(&vp->vdev->dev, "cmd %u: control queue broken\n", cmd);
			vp->broken = true;
			return -EIO;
		}
		if (time_after(jiffies, deadline)) {
			dev_err(&vp->vdev->dev, "cmd %u: no answer within %u ms; no more commands until reset\n",
				cmd, cmd_timeout_ms);
			vp->broken = true;
			return -ETIMEDOUT;
		}
		usleep_range(50, 200);
	}
	if (token != b) { /* only one buffer is ever in flight */
		dev_err(&vp->vdev->dev, "cmd %u: device returned an unknown buffer\n", cmd);
		vp->broken = true;
		return -EPROTO;
	}
	vp->busy = false;
	if (used_len)
		*used_len = len;

	st = le32_to_cpu(b->in.status.status);
	if (len < sizeof(b->in.status) || len > sizeof(b->in.status) + resp_len) {
		dev_err(&vp->vdev->dev, "cmd %u: used length %u, expected 8 or %zu\n",
			cmd, len, sizeof(b->in.status) + resp_len);
		return -EPROTO;
	}
	if (st > MAX_ERRNO) {
		dev_err(&vp->vdev->dev, "cmd %u: status %u is not an errno value\n", cmd, st);
		return -EPROTO;
	}
	if (st != 0 && len != sizeof(b->in.status)) {
		dev_err(&vp->vdev->dev, "cmd %u: status %u with used length %u (expected 8)\n", cmd, st, len);
		return -EPROTO;
	}
	/* raw commands pass resp_len = the buffer size and accept any length */
	if (st == 0 && resp && len != sizeof(b->in.status) + resp_len) {
		dev_err(&vp->vdev->dev, "cmd %u: used length %u, expected %zu\n",
			cmd, len, sizeof(b->in.status) + resp_len);
		return -EPROTO;
	}
	if (st == 0 && resp)
		memcpy(resp, b->in.resp, resp_len);
	*status = st;
	return 0;
}

/* rc as a driver would return it; fills "rc=.. status=.." into vp->result */
static int vrdma_result_head(struct vrdma_probe *vp, const char *name, int err, u32 status)
{
	int rc = err ? err : -(int)status;

	if (err)
		scnprintf(vp->result, sizeof(vp->result), "cmd=%s rc=%d status=none", name, rc);
	else
		scnprintf(vp->result, sizeof(vp->result), "cmd=%s rc=%d status=%u", name, rc, status);
	return rc;
}

static __printf(2, 3) void vrdma_result_add(struct vrdma_probe *vp, const char *fmt, ...)
{
	size_t n = strlen(vp->result);
	va_list ap;

	va_start(ap, fmt);
	vscnprintf(vp->result + n, sizeof(vp->result) - n, fmt, ap);
	va_end(ap);
}

static void vrdma_log(struct vrdma_probe *vp)
{
	vp->ncmds++;
	dev_info(&vp->vdev->dev, "%s\n", vp->result);
}

/* ------------------------------------------------------------------ commands */

static int vrdma_query_device(struct vrdma_probe *vp)
{
	struct vrdma_query_device_resp r;
	u32 status = 0;
	int err, rc;

	err = vrdma_exec(vp, VRDMA_CMD_QUERY_DEVICE, NULL, 0, &r, sizeof(r), &status, NULL);
	rc = vrdma_result_head(vp, "query_device", err, status);
	if (rc == 0) {
		vp->qd = r;
		vrdma_result_add(vp, " vendor_id=0x%x max_pd=%u max_cq=%u max_cqe=%u max_qp=%u max_qp_wr=%u max_mr=%u",
				 le32_to_cpu(r.vendor_id), le32_to_cpu(r.max_pd), le32_to_cpu(r.max_cq),
				 le32_to_cpu(r.max_cqe), le32_to_cpu(r.max_qp), le32_to_cpu(r.max_qp_wr),
				 le32_to_cpu(r.max_mr));
		if (le32_to_cpu(r.max_cq) > vp->num_cq_slots || le32_to_cpu(r.max_qp) > vp->num_qp_slots)
			dev_warn(&vp->vdev->dev, "QUERY_DEVICE: max_cq %u / max_qp %u exceed the %u CQ / %u QP slots\n",
				 le32_to_cpu(r.max_cq), le32_to_cpu(r.max_qp), vp->num_cq_slots, vp->num_qp_slots);
	}
	vrdma_log(vp);
	return rc;
}

static int vrdma_query_port(struct vrdma_probe *vp, u32 port)
{
	struct vrdma_handle req = { .handle = cpu_to_le32(port) };
	struct vrdma_query_port_resp r;
	u32 status = 0;
	int err, rc;

	err = vrdma_exec(vp, VRDMA_CMD_QUERY_PORT, &req, sizeof(req), &r, sizeof(r), &status, NULL);
	rc = vrdma_result_head(vp, "query_port", err, status);
	if (rc == 0)
		vrdma_result_add(vp, " port=%u state=%u active_mtu=%u gid_tbl_len=%u link_layer=%u",
				 port, r.state, r.active_mtu, le32_to_cpu(r.gid_tbl_len), r.link_layer);
	vrdma_log(vp);
	return rc;
}

static int vrdma_create_pd(struct vrdma_probe *vp)
{
	struct vrdma_create_pd_resp r;
	u32 status = 0;
	int err, rc;

	err = vrdma_exec(vp, VRDMA_CMD_CREATE_PD, NULL, 0, &r, sizeof(r), &status, NULL);
	if (!err && status == 0 && le32_to_cpu(r.pdn) == 0) {
		dev_err(&vp->vdev->dev, "CREATE_PD: device returned handle 0\n");
		err = -EPROTO;
	}
	rc = vrdma_result_head(vp, "create_pd", err, status);
	if (rc == 0)
		vrdma_result_add(vp, " pdn=%u", le32_to_cpu(r.pdn));
	vrdma_log(vp);
	return rc;
}

static int vrdma_destroy(struct vrdma_probe *vp, u32 cmd, const char *name, u32 handle)
{
	struct vrdma_handle req = { .handle = cpu_to_le32(handle) };
	u32 status = 0;
	unsigned int s;
	int err, rc;

	err = vrdma_exec(vp, cmd, &req, sizeof(req), NULL, 0, &status, NULL);
	rc = vrdma_result_head(vp, name, err, status);
	vrdma_result_add(vp, " handle=%u", handle);
	if (rc == 0 && cmd == VRDMA_CMD_DESTROY_CQ) {
		for (s = 0; s < vp->num_cq_slots; s++) {
			if (handle && vp->cq_of_slot[s] == handle) {
				vp->cq_of_slot[s] = 0;
				vrdma_result_add(vp, " slot=%u", s);
			}
		}
	}
	vrdma_log(vp);
	return rc;
}

static int vrdma_create_cq(struct vrdma_probe *vp, u32 cqe)
{
	struct vrdma_create_cq req = { .cqe = cpu_to_le32(cqe) };
	struct vrdma_create_cq_resp r;
	u32 status = 0, cqn = 0, slot = 0, granted = 0, s;
	int err, rc;

	err = vrdma_exec(vp, VRDMA_CMD_CREATE_CQ, &req, sizeof(req), &r, sizeof(r), &status, NULL);
	if (!err && status == 0) {
		cqn = le32_to_cpu(r.cqn);
		slot = le32_to_cpu(r.slot);
		granted = le32_to_cpu(r.cqe);
		/* nothing from the device is used unchecked */
		if (cqn == 0) {
			dev_err(&vp->vdev->dev, "CREATE_CQ: device returned handle 0\n");
			err = -EPROTO;
		} else if (slot >= vp->num_cq_slots) {
			dev_err(&vp->vdev->dev, "CREATE_CQ: cqn %u in slot %u, but there are %u CQ slots\n",
				cqn, slot, vp->num_cq_slots);
			err = -EPROTO;
		} else if (vp->cq_of_slot[slot] != 0) {
			dev_err(&vp->vdev->dev, "CREATE_CQ: cqn %u in slot %u, which cqn %u holds\n",
				cqn, slot, vp->cq_of_slot[slot]);
			err = -EPROTO;
		} else if (granted == 0 || granted > cqe ||
			   granted >= virtqueue_get_vring_size(vp->vqs[1 + slot])) {
			dev_err(&vp->vdev->dev, "CREATE_CQ: cqn %u granted %u entries (asked %u, ring %u)\n",
				cqn, granted, cqe, virtqueue_get_vring_size(vp->vqs[1 + slot]));
			err = -EPROTO;
		} else {
			for (s = 0; s < vp->num_cq_slots; s++) {
				if (vp->cq_of_slot[s] == cqn) {
					dev_err(&vp->vdev->dev, "CREATE_CQ: cqn %u already lives in slot %u\n", cqn, s);
					err = -EPROTO;
				}
			}
			if (!err)
				vp->cq_of_slot[slot] = cqn;
		}
	}
	rc = vrdma_result_head(vp, "create_cq", err, status);
	if (rc == 0)
		vrdma_result_add(vp, " cqn=%u slot=%u cqe=%u vq=%u", cqn, slot, granted, 1 + slot);
	else
		vrdma_result_add(vp, " cqe=%u", cqe);
	vrdma_log(vp);
	return rc;
}

/* raw CMD [W...]: any command; prints the response words it got */
static int vrdma_raw(struct vrdma_probe *vp, u32 cmd, const u32 *words, unsigned int nwords)
{
	__le32 req[VRDMA_RAW_WORDS];
	unsigned int i, len = 0;
	u32 status = 0;
	int err, rc;

	for (i = 0; i < nwords; i++)
		req[i] = cpu_to_le32(words[i]);
	/* resp NULL: any length up to the buffer is accepted (the checks of vrdma_exec still run) */
	err = vrdma_exec(vp, cmd, req, nwords * 4, NULL, VRDMA_RESP_MAX, &status, &len);
	if (!err && (len % 4)) {
		dev_err(&vp->vdev->dev, "raw cmd %u: used length %u is not a multiple of 4\n", cmd, len);
		err = -EPROTO;
	}
	rc = vrdma_result_head(vp, "raw", err, status);
	vrdma_result_add(vp, " code=%u", cmd);
	if (!err) {
		vrdma_result_add(vp, " len=%u resp=", len);
		for (i = 0; i + 8 < len && i < VRDMA_RESP_MAX; i += 4)
			vrdma_result_add(vp, "%s%u", i ? "," : "",
					 le32_to_cpup((__le32 *)&vp->buf->in.resp[i]));
	}
	vrdma_log(vp);
	return rc;
}

/* ------------------------------------------------------------------ sysfs */

static int parse_u32s(char **s, u32 *out, unsigned int max, unsigned int *n)
{
	char *tok;

	*n = 0;
	while ((tok = strsep(s, " \t")) != NULL) {
		if (!*tok)
			continue;
		if (*n == max || kstrtou32(tok, 0, &out[*n]))
			return -EINVAL;
		(*n)++;
	}
	return 0;
}

static ssize_t probe_cmd_store(struct device *dev, struct device_attribute *attr,
			       const char *ubuf, size_t count)
{
	struct virtio_device *vdev = dev_to_virtio(dev);
	struct vrdma_probe *vp = vdev->priv;
	u32 args[1 + VRDMA_RAW_WORDS];
	char line[256], *s, *name;
	unsigned int n;

	if (count >= sizeof(line))
		return -EINVAL;
	memcpy(line, ubuf, count);
	line[count] = '\0';
	s = strim(line);
	name = strsep(&s, " \t");
	if (!name || !*name)
		return -EINVAL;
	if (parse_u32s(&s, args, ARRAY_SIZE(args), &n))
		return -EINVAL;

	mutex_lock(&vp->lock);
	if (!strcmp(name, "query_device") && n == 0)
		vrdma_query_device(vp);
	else if (!strcmp(name, "query_port") && n <= 1)
		vrdma_query_port(vp, n ? args[0] : 1);
	else if (!strcmp(name, "create_pd") && n == 0)
		vrdma_create_pd(vp);
	else if (!strcmp(name, "destroy_pd") && n == 1)
		vrdma_destroy(vp, VRDMA_CMD_DESTROY_PD, "destroy_pd", args[0]);
	else if (!strcmp(name, "create_cq") && n <= 1)
		vrdma_create_cq(vp, n ? args[0] : 15);
	else if (!strcmp(name, "destroy_cq") && n == 1)
		vrdma_destroy(vp, VRDMA_CMD_DESTROY_CQ, "destroy_cq", args[0]);
	else if (!strcmp(name, "raw") && n >= 1)
		vrdma_raw(vp, args[0], args + 1, n - 1);
	else
		count = -EINVAL;
	mutex_unlock(&vp->lock);
	return count;
}
static DEVICE_ATTR_WO(probe_cmd);

static ssize_t probe_result_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vrdma_probe *vp = dev_to_virtio(dev)->priv;
	ssize_t n;

	mutex_lock(&vp->lock);
	n = sysfs_emit(buf, "%s\n", vp->result);
	mutex_unlock(&vp->lock);
	return n;
}
static DEVICE_ATTR_RO(probe_result);

static ssize_t probe_info_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vrdma_probe *vp = dev_to_virtio(dev)->priv;
	const struct vrdma_query_device_resp *q = &vp->qd;
	unsigned int s;
	ssize_t n;

	mutex_lock(&vp->lock);
	n = sysfs_emit(buf, "abi_version=%u num_cq_slots=%u num_qp_slots=%u num_vqs=%u phys_port_cnt=%u node_guid=0x%llx\n",
		       vp->abi_version, vp->num_cq_slots, vp->num_qp_slots, vp->nvqs, vp->phys_port_cnt,
		       vp->node_guid);
	n += sysfs_emit_at(buf, n, "config max_cq=%u max_cqe=%u max_qp=%u\n",
			   vp->cfg_max_cq, vp->cfg_max_cqe, vp->cfg_max_qp);
	n += sysfs_emit_at(buf, n, "vq_size ctrl=%u cq=%u..%u qp=%u..%u\n", vp->ctrl_size,
			   vp->cq_size_min, vp->cq_size_max, vp->qp_size_min, vp->qp_size_max);
	n += sysfs_emit_at(buf, n, "query_device vendor_id=0x%x max_pd=%u max_cq=%u max_cqe=%u max_qp=%u max_mr=%u\n",
			   le32_to_cpu(q->vendor_id), le32_to_cpu(q->max_pd), le32_to_cpu(q->max_cq),
			   le32_to_cpu(q->max_cqe), le32_to_cpu(q->max_qp), le32_to_cpu(q->max_mr));
	n += sysfs_emit_at(buf, n, "commands=%lu broken=%d cqs=", vp->ncmds, vp->broken);
	for (s = 0; s < vp->num_cq_slots; s++)
		if (vp->cq_of_slot[s])
			n += sysfs_emit_at(buf, n, "%u:%u,", vp->cq_of_slot[s], s);
	n += sysfs_emit_at(buf, n, "\n");
	mutex_unlock(&vp->lock);
	return n;
}
static DEVICE_ATTR_RO(probe_info);

static struct attribute *vrdma_probe_attrs[] = {
	&dev_attr_probe_cmd.attr,
	&dev_attr_probe_result.attr,
	&dev_attr_probe_info.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vrdma_probe);

/* ------------------------------------------------------------------ probe/remove */

static void vrdma_teardown(struct vrdma_probe *vp)
{
	struct virtio_device *vdev = vp->vdev;

	/* after the reset the device touches no ring and no buffer */
	virtio_reset_device(vdev);
	if (vp->ctrl)
		while (virtqueue_detach_unused_buf(vp->ctrl))
			;
	vp->busy = false;
	vdev->config->del_vqs(vdev);
}

static int vrdma_probe(struct virtio_device *vdev)
{
	vq_callback_t **callbacks = NULL;
	const char **names = NULL;
	struct vrdma_probe *vp;
	unsigned int i, sz;
	u16 c, q;
	int err;

	virtio_cread_le(vdev, struct vrdma_config, num_cq_slots, &c);
	virtio_cread_le(vdev, struct vrdma_config, num_qp_slots, &q);
	vp = kzalloc(sizeof(*vp), GFP_KERNEL);
	if (!vp)
		return -ENOMEM;
	vp->vdev = vdev;
	mutex_init(&vp->lock);
	virtio_cread_le(vdev, struct vrdma_config, abi_version, &vp->abi_version);
	virtio_cread_le(vdev, struct vrdma_config, max_cq, &vp->cfg_max_cq);
	virtio_cread_le(vdev, struct vrdma_config, max_cqe, &vp->cfg_max_cqe);
	virtio_cread_le(vdev, struct vrdma_config, max_qp, &vp->cfg_max_qp);
	virtio_cread_le(vdev, struct vrdma_config, phys_port_cnt, &vp->phys_port_cnt);
	virtio_cread_le(vdev, struct vrdma_config, node_guid, &vp->node_guid);
	vp->num_cq_slots = c;
	vp->num_qp_slots = q;
	vp->nvqs = 1 + (unsigned int)c + 2 * (unsigned int)q;

	if (vp->abi_version != VRDMA_ABI_VERSION) {
		dev_err(&vdev->dev, "ABI version %u, this probe speaks %u\n", vp->abi_version, VRDMA_ABI_VERSION);
		err = -ENODEV;
		goto err_free;
	}
	if (c == 0 || q == 0 || vp->nvqs > VRDMA_MAX_VQS) {
		dev_err(&vdev->dev, "impossible queue layout: %u CQ slots, %u QP slots (%u virtqueues)\n",
			c, q, vp->nvqs);
		err = -ENODEV;
		goto err_free;
	}

	err = -ENOMEM;
	vp->buf = kzalloc(sizeof(*vp->buf), GFP_KERNEL);
	vp->cq_of_slot = kcalloc(c, sizeof(*vp->cq_of_slot), GFP_KERNEL);
	vp->vqs = kcalloc(vp->nvqs, sizeof(*vp->vqs), GFP_KERNEL);
	callbacks = kcalloc(vp->nvqs, sizeof(*callbacks), GFP_KERNEL); /* all NULL: polled / unused */
	names = kcalloc(vp->nvqs, sizeof(*names), GFP_KERNEL);
	if (!vp->buf || !vp->cq_of_slot || !vp->vqs || !callbacks || !names)
		goto err_free;
	/* a NULL name would skip the queue (6.1): every queue gets one */
	names[0] = "ctrl";
	for (i = 1; i < vp->nvqs; i++)
		names[i] = i <= c ? "cq" : ((i - 1 - c) % 2 ? "rq" : "sq");

	err = virtio_find_vqs(vdev, vp->nvqs, vp->vqs, callbacks, names, NULL);
	if (err) {
		dev_err(&vdev->dev, "setting up %u virtqueues failed: %d\n", vp->nvqs, err);
		goto err_free;
	}
	vp->ctrl = vp->vqs[0];
	vdev->priv = vp;

	vp->ctrl_size = virtqueue_get_vring_size(vp->ctrl);
	vp->cq_size_min = vp->qp_size_min = UINT_MAX;
	for (i = 1; i < vp->nvqs; i++) {
		sz = virtqueue_get_vring_size(vp->vqs[i]);
		if (i <= c) {
			vp->cq_size_min = min(vp->cq_size_min, sz);
			vp->cq_size_max = max(vp->cq_size_max, sz);
		} else {
			vp->qp_size_min = min(vp->qp_size_min, sz);
			vp->qp_size_max = max(vp->qp_size_max, sz);
		}
	}
	kfree(callbacks);
	kfree(names);
	callbacks = NULL;
	names = NULL;

	virtio_device_ready(vdev); /* DRIVER_OK: the back-end starts the rings */

	mutex_lock(&vp->lock);
	err = vrdma_query_device(vp);
	mutex_unlock(&vp->lock);
	if (err) {
		dev_err(&vdev->dev, "QUERY_DEVICE failed: %d\n", err);
		goto err_reset;
	}
	dev_info(&vdev->dev, "virtio-rdma probe: abi %u, %u CQ slots, %u QP slots, %u virtqueues (ctrl %u, cq %u..%u, qp %u..%u entries), DRIVER_OK\n",
		 vp->abi_version, c, q, vp->nvqs, vp->ctrl_size, vp->cq_size_min, vp->cq_size_max,
		 vp->qp_size_min, vp->qp_size_max);
	return 0;

err_reset:
	vrdma_teardown(vp);
	vdev->priv = NULL;
err_free:
	kfree(callbacks);
	kfree(names);
	kfree(vp->vqs);
	kfree(vp->cq_of_slot);
	kfree(vp->buf);
	kfree(vp);
	return err;
}

static void vrdma_remove(struct virtio_device *vdev)
{
	struct vrdma_probe *vp = vdev->priv;

	/* the sysfs files (driver.dev_groups) are already gone: no command runs */
	mutex_lock(&vp->lock);
	vp->broken = true;
	vrdma_teardown(vp);
	mutex_unlock(&vp->lock);
	dev_info(&vdev->dev, "virtio-rdma probe: removed after %lu commands (device reset)\n", vp->ncmds);
	vdev->priv = NULL;
	kfree(vp->vqs);
	kfree(vp->cq_of_slot);
	kfree(vp->buf);
	kfree(vp);
}

static const struct virtio_device_id vrdma_id_table[] = {
	{ VIRTIO_ID_RDMA_PROBE, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vrdma_id_table);

static struct virtio_driver vrdma_probe_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.driver.dev_groups = vrdma_probe_groups,
	.id_table = vrdma_id_table,
	.probe = vrdma_probe,
	.remove = vrdma_remove,
};
module_virtio_driver(vrdma_probe_driver);

MODULE_DESCRIPTION("vrdma: minimal virtio-rdma probe (control queue test driver, not an RDMA driver)");
MODULE_LICENSE("GPL");

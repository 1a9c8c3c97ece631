/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The virtio-rdma device ABI, version 1 (docs/virtio-rdma.md). Every
 * struct is little-endian and naturally aligned, so it is laid out here
 * exactly as the device reads and writes it.
 */
#ifndef VIRTIO_RDMA_ABI_H
#define VIRTIO_RDMA_ABI_H

#include <linux/build_bug.h>
#include <linux/stddef.h>
#include <linux/types.h>

#define VIRTIO_ID_RDMA_DEV	42	/* not in 6.1's virtio_ids.h */
#define VRDMA_ABI_VERSION	1

/*
 * Device feature bit 0: UD receives carry an IB / RoCE v1 GRH (IPv6 format,
 * next header 0x1B) for every GID, instead of RoCEv2's IPv4 header for
 * IPv4-mapped GIDs. This driver shows IB-typed GIDs, so it takes it: then
 * ibv_init_ah_from_wc() and ib_init_ah_attr_from_wc() parse what they get.
 */
#define VIRTIO_RDMA_F_IB_GRH	0
#define VRDMA_PAGE_SIZE		4096
#define VRDMA_PAGE_LIST_ENTRIES	512
#define VRDMA_MAX_MR_PAGES	(VRDMA_PAGE_LIST_ENTRIES * VRDMA_PAGE_LIST_ENTRIES)

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

enum vrdma_cmd {
	VRDMA_CMD_QUERY_DEVICE = 1,
	VRDMA_CMD_QUERY_PORT = 2,
	VRDMA_CMD_QUERY_GID = 3,
	VRDMA_CMD_QUERY_PKEY = 4,
	VRDMA_CMD_CREATE_PD = 5,
	VRDMA_CMD_DESTROY_PD = 6,
	VRDMA_CMD_CREATE_CQ = 7,
	VRDMA_CMD_DESTROY_CQ = 8,
	VRDMA_CMD_REQ_NOTIFY_CQ = 9,
	VRDMA_CMD_REG_MR = 10,
	VRDMA_CMD_GET_DMA_MR = 11,
	VRDMA_CMD_DEREG_MR = 12,
	VRDMA_CMD_CREATE_QP = 13,
	VRDMA_CMD_MODIFY_QP = 14,
	VRDMA_CMD_QUERY_QP = 15,
	VRDMA_CMD_DESTROY_QP = 16,
	VRDMA_CMD_CREATE_AH = 17,
	VRDMA_CMD_DESTROY_AH = 18,
};

struct vrdma_ctrl_hdr {
	__le32 cmd;
	__le32 reserved;
};

struct vrdma_ctrl_status {
	__le32 status;
	__le32 reserved;
};

/* DESTROY_*, DEREG_MR, QUERY_QP; QUERY_PORT's {port} has the same shape */
struct vrdma_handle {
	__le32 handle;
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

/* QUERY_GID and QUERY_PKEY */
struct vrdma_query_index {
	__le32 port;
	__le32 index;
};

struct vrdma_query_gid_resp {
	__u8 gid[16];
	__le32 gid_type;
	__le32 reserved;
};

struct vrdma_query_pkey_resp {
	__le16 pkey;
	__le16 reserved;
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

enum {
	VRDMA_NOTIFY_SOLICITED = 1,
	VRDMA_NOTIFY_NEXT_COMPLETION = 2,
};

struct vrdma_req_notify_cq {
	__le32 cqn;
	__le32 flags;
};

struct vrdma_reg_mr {
	__le32 pdn;
	__le32 access;
	__le64 iova;
	__le64 length;
	__le64 page_list;
	__le32 npages;
	__le32 reserved;
};

struct vrdma_get_dma_mr {
	__le32 pdn;
	__le32 access;
};

struct vrdma_mr_resp {
	__le32 mrn;
	__le32 lkey;
	__le32 rkey;
	__le32 reserved;
};

enum {
	VRDMA_ACCESS_LOCAL_WRITE = 1,
	VRDMA_ACCESS_REMOTE_WRITE = 2,
	VRDMA_ACCESS_REMOTE_READ = 4,
	VRDMA_ACCESS_REMOTE_ATOMIC = 8,
};

enum {
	VRDMA_QPT_RC = 2,
	VRDMA_QPT_UC = 3,
	VRDMA_QPT_UD = 4,
};

struct vrdma_create_qp {
	__le32 pdn;
	__u8 qp_type;
	__u8 sq_sig_all;
	__le16 reserved0;
	__le32 send_cqn;
	__le32 recv_cqn;
	__le32 max_send_wr;
	__le32 max_recv_wr;
	__le32 max_send_sge;
	__le32 max_recv_sge;
	__le32 max_inline_data;
	__le32 reserved1;
};

struct vrdma_create_qp_resp {
	__le32 qpn;
	__le32 slot;
	__le32 max_send_wr;
	__le32 max_recv_wr;
	__le32 max_send_sge;
	__le32 max_recv_sge;
	__le32 max_inline_data;
	__le32 reserved;
};

struct vrdma_ah_attr {
	__u8 dgid[16];
	__le32 flow_label;
	__u8 sgid_index;
	__u8 hop_limit;
	__u8 traffic_class;
	__u8 sl;
	__u8 port_num;
	__u8 static_rate;
	__le16 reserved;
};

struct vrdma_qp_attr {
	__u8 qp_state;
	__u8 cur_qp_state;
	__u8 path_mtu;
	__u8 timeout;
	__u8 retry_cnt;
	__u8 rnr_retry;
	__u8 min_rnr_timer;
	__u8 max_rd_atomic;
	__u8 max_dest_rd_atomic;
	__u8 sq_draining;
	__le16 pkey_index;
	__le32 qp_access_flags;
	__le32 qkey;
	__le32 rq_psn;
	__le32 sq_psn;
	__le32 dest_qp_num;
	__u8 port_num;
	__u8 reserved0;
	__le16 reserved1;
	struct vrdma_ah_attr ah;
};

struct vrdma_modify_qp {
	__le32 qpn;
	__le32 attr_mask;
	struct vrdma_qp_attr attr;
};

struct vrdma_query_qp_resp {
	struct vrdma_qp_attr attr;
	__u8 qp_type;
	__u8 sq_sig_all;
	__le16 reserved0;
	__le32 max_send_wr;
	__le32 max_recv_wr;
	__le32 max_send_sge;
	__le32 max_recv_sge;
	__le32 max_inline_data;
};

struct vrdma_create_ah {
	__le32 pdn;
	__le32 reserved;
	struct vrdma_ah_attr ah;
};

struct vrdma_create_ah_resp {
	__le32 ahn;
	__le32 reserved;
};

struct vrdma_sge {
	__le64 addr;
	__le32 length;
	__le32 lkey;
};

enum {
	VRDMA_WR_RDMA_WRITE = 0,
	VRDMA_WR_RDMA_WRITE_WITH_IMM = 1,
	VRDMA_WR_SEND = 2,
	VRDMA_WR_SEND_WITH_IMM = 3,
	VRDMA_WR_RDMA_READ = 4,
	VRDMA_WR_ATOMIC_CMP_AND_SWP = 5,
	VRDMA_WR_ATOMIC_FETCH_AND_ADD = 6,
};

enum {
	VRDMA_SEND_FENCE = 1,
	VRDMA_SEND_SIGNALED = 2,
	VRDMA_SEND_SOLICITED = 4,
	VRDMA_SEND_INLINE = 8,
};

struct vrdma_send_wqe {
	__le64 wr_id;
	__u8 opcode;
	__u8 send_flags;
	__le16 num_sge;
	__be32 imm_data;	/* carried as verbs gives it: network order */
	__le64 remote_addr;
	__le64 compare_add;
	__le64 swap;
	__le32 rkey;
	__le32 ahn;
	__le32 remote_qpn;
	__le32 remote_qkey;
	__le32 inline_len;
	__le32 reserved;
};

struct vrdma_recv_wqe {
	__le64 wr_id;
	__le16 num_sge;
	__le16 reserved0;
	__le32 reserved1;
};

#define VRDMA_WC_OPCODE_CQ_ERROR	255
#define VRDMA_WC_FLAG_GRH		1
#define VRDMA_WC_FLAG_WITH_IMM		2

struct vrdma_cqe {
	__le64 wr_id;
	__u8 status;
	__u8 opcode;
	__le16 wc_flags;
	__le32 vendor_err;
	__le32 byte_len;
	__be32 imm_data;
	__le32 qp_num;
	__le32 src_qp;
	__le16 pkey_index;
	__u8 sl;
	__u8 port_num;
	__le32 reserved0;
	__le64 reserved1;
};

static_assert(sizeof(struct vrdma_config) == 128);
static_assert(offsetof(struct vrdma_config, max_mr_size) == 48);
static_assert(offsetof(struct vrdma_config, node_guid) == 64);
static_assert(sizeof(struct vrdma_query_device_resp) == 120);
static_assert(sizeof(struct vrdma_query_port_resp) == 24);
static_assert(sizeof(struct vrdma_query_gid_resp) == 24);
static_assert(sizeof(struct vrdma_reg_mr) == 40);
static_assert(sizeof(struct vrdma_create_qp) == 40);
static_assert(sizeof(struct vrdma_create_qp_resp) == 32);
static_assert(sizeof(struct vrdma_ah_attr) == 28);
static_assert(sizeof(struct vrdma_qp_attr) == 64);
static_assert(sizeof(struct vrdma_modify_qp) == 72);
static_assert(sizeof(struct vrdma_query_qp_resp) == 88);
static_assert(sizeof(struct vrdma_create_ah) == 36);
static_assert(sizeof(struct vrdma_sge) == 16);
static_assert(sizeof(struct vrdma_send_wqe) == 64);
static_assert(sizeof(struct vrdma_recv_wqe) == 16);
static_assert(sizeof(struct vrdma_cqe) == 48);

#endif /* VIRTIO_RDMA_ABI_H */

// Socket-level load balancing for ClusterIP traffic: cgroup sock_addr programs that choose a
// Service's endpoint when the application calls connect() or sendto(), so packets leave the
// socket already addressed to the endpoint (no DNAT, no conntrack NAT entry).
//
// Written by kpr-socklb (crates/kpr-socklb/src/plan.rs holds the byte layout of every key and
// value below; keep the two in step). A VIP:port that is not in `services` is left alone (the
// programs return 1 without touching the address), so the nftables rules handle it.
//
// Byte order: addresses and ports are in network byte order, as the kernel hands them to us in
// ctx->user_ip4 / user_ip6 / user_port; ids, counts, slots, seconds and flags are in host order.
//
// IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, used by dual-stack sockets) seen by the IPv6
// hooks are looked up as IPv4 Services, and the chosen IPv4 endpoint is written back mapped.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// From the C library's headers, which are not meant for the BPF target.
#define ECONNREFUSED 111
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

// Service flags.
#define SVC_F_REFUSE 1 // no usable endpoint: connect()/sendmsg() fail with ECONNREFUSED

#define FAMILY_V4 4
#define FAMILY_V6 6

// An address and port; an IPv4 address sits in addr[0], addr[1..3] are zero. 20 bytes.
struct addr_port {
	__u32 addr[4];
	__u16 port; // network order
	__u16 pad;
};

// `services` key: a ClusterIP, port and protocol. 20 bytes.
struct svc_key {
	__u8 family; // 4 or 6
	__u8 proto;  // IPPROTO_TCP or IPPROTO_UDP
	__u16 port;  // network order
	__u32 addr[4];
};

// `services` value. 16 bytes.
struct svc_val {
	__u32 id;       // backend list generation: `backends` keys {id, 0..count}
	__u32 count;    // number of backends (0 only with SVC_F_REFUSE)
	__u32 affinity; // ClientIP affinity timeout in seconds; 0 = none
	__u32 flags;    // SVC_F_*
};

// `backends` key. 8 bytes. Value: struct addr_port.
struct be_key {
	__u32 id;
	__u32 slot;
};

// `members` key: is this endpoint in list `id`? 24 bytes. Value: its slot (__u32).
struct member_key {
	__u32 id;
	__u16 port; // network order
	__u16 pad;
	__u32 addr[4];
};

// `revnat` key: a socket and the endpoint it was sent to. 32 bytes. Value: struct addr_port,
// the ClusterIP:port the application asked for.
struct revnat_key {
	__u64 cookie; // bpf_get_socket_cookie
	struct addr_port peer;
	__u32 pad;
};

// `affinity` key: who sticks to an endpoint, for a Service (by VIP, not by id, so it
// survives a new backend list). 32 bytes.
//   AFF_CLIENT: ClientIP affinity; owner = the client's network namespace (one per pod).
//   AFF_SOCKET: an unconnected UDP socket keeps the endpoint its first datagram went to, as
//               a conntrack flow does in the nftables mode; owner = the socket.
#define AFF_CLIENT 0
#define AFF_SOCKET 1
struct aff_key {
	__u64 owner; // bpf_get_netns_cookie or bpf_get_socket_cookie
	struct svc_key svc;
	__u32 kind; // AFF_*
};

// `affinity` value. 32 bytes.
struct aff_val {
	__u64 last_ns; // bpf_ktime_get_ns of the last use
	struct addr_port backend;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct be_key);
	__type(value, struct addr_port);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct member_key);
	__type(value, __u32);
} members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct revnat_key);
	__type(value, struct addr_port);
} revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct aff_key);
	__type(value, struct aff_val);
} affinity SEC(".maps");

// What lb() decided.
enum verdict {
	PASS,     // not a Service of ours: leave the address alone
	REWRITTEN,// *dst now holds the endpoint
	REFUSE,   // a Service without endpoints
};

// Only TCP stream and UDP datagram sockets are balanced.
static __always_inline int proto_of(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return IPPROTO_TCP;
	if (ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

// Chooses an endpoint for the Service at `key`; on REWRITTEN, `out` is the endpoint and the
// socket's reverse translation is recorded. `sendmsg`: an unconnected UDP datagram.
static __always_inline enum verdict lb(struct bpf_sock_addr *ctx, struct svc_key *key,
				       struct addr_port *out, int sendmsg)
{
	struct svc_val *svc = bpf_map_lookup_elem(&services, key);
	if (!svc)
		return PASS;
	// Copy once: a concurrent update replaces the whole element.
	__u32 id = svc->id, count = svc->count, aff_secs = svc->affinity, flags = svc->flags;
	if (flags & SVC_F_REFUSE || count == 0)
		return REFUSE;

	// ClientIP affinity first; else an unconnected UDP socket sticks to its endpoint.
	int sticky = aff_secs || sendmsg;
	struct aff_key akey;
	__builtin_memset(&akey, 0, sizeof(akey));
	__u64 now = 0;
	struct addr_port *be = 0;
	if (sticky) {
		if (aff_secs) {
			akey.owner = bpf_get_netns_cookie(ctx);
			akey.kind = AFF_CLIENT;
		} else {
			akey.owner = bpf_get_socket_cookie(ctx);
			akey.kind = AFF_SOCKET;
		}
		akey.svc = *key;
		now = bpf_ktime_get_ns();
		struct aff_val *a = bpf_map_lookup_elem(&affinity, &akey);
		if (a && (!aff_secs || now - a->last_ns <= (__u64)aff_secs * 1000000000ULL)) {
			// Reuse it only while it is still in the Service's current list.
			struct member_key mkey;
			__builtin_memset(&mkey, 0, sizeof(mkey));
			mkey.id = id;
			mkey.port = a->backend.port;
			__builtin_memcpy(mkey.addr, a->backend.addr, sizeof(mkey.addr));
			if (bpf_map_lookup_elem(&members, &mkey))
				be = &a->backend;
		}
	}
	if (!be) {
		struct be_key bkey = { .id = id, .slot = bpf_get_prandom_u32() % count };
		be = bpf_map_lookup_elem(&backends, &bkey);
		// Absent only while userspace is between switching `services` to a new id and
		// deleting the old one's backends: let nftables handle this one connection.
		if (!be)
			return PASS;
	}
	*out = *be;
	out->pad = 0;

	if (sticky) {
		struct aff_val val;
		__builtin_memset(&val, 0, sizeof(val));
		val.last_ns = now;
		val.backend = *out;
		bpf_map_update_elem(&affinity, &akey, &val, BPF_ANY);
	}

	struct revnat_key rkey;
	__builtin_memset(&rkey, 0, sizeof(rkey));
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.peer = *out;
	struct addr_port vip;
	__builtin_memset(&vip, 0, sizeof(vip));
	__builtin_memcpy(vip.addr, key->addr, sizeof(vip.addr));
	vip.port = key->port;
	bpf_map_update_elem(&revnat, &rkey, &vip, BPF_ANY);
	return REWRITTEN;
}

// The ClusterIP:port a socket's peer `peer` stands for, or 0.
static __always_inline struct addr_port *revnat_of(struct bpf_sock_addr *ctx,
						   struct addr_port *peer)
{
	struct revnat_key rkey;
	__builtin_memset(&rkey, 0, sizeof(rkey));
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.peer = *peer;
	rkey.peer.pad = 0;
	return bpf_map_lookup_elem(&revnat, &rkey);
}

// ---- IPv4 ----

static __always_inline void key4(struct bpf_sock_addr *ctx, struct svc_key *key, int proto)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = FAMILY_V4;
	key->proto = proto;
	key->port = (__u16)ctx->user_port;
	key->addr[0] = ctx->user_ip4;
}

// connect4 and sendmsg4: pick an endpoint. Returns the program's verdict (1 = go on).
static __always_inline int forward4(struct bpf_sock_addr *ctx, int sendmsg)
{
	int proto = proto_of(ctx);
	if (!proto)
		return 1;
	struct svc_key key;
	struct addr_port be;
	key4(ctx, &key, proto);
	switch (lb(ctx, &key, &be, sendmsg)) {
	case REWRITTEN:
		ctx->user_ip4 = be.addr[0];
		ctx->user_port = be.port;
		return 1;
	case REFUSE:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		return 1;
	}
}

// recvmsg4 and getpeername4: show the ClusterIP:port instead of the endpoint.
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	if (!proto_of(ctx))
		return 1;
	struct addr_port peer;
	__builtin_memset(&peer, 0, sizeof(peer));
	peer.addr[0] = ctx->user_ip4;
	peer.port = (__u16)ctx->user_port;
	struct addr_port *vip = revnat_of(ctx, &peer);
	if (vip) {
		ctx->user_ip4 = vip->addr[0];
		ctx->user_port = vip->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 0);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 1);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

// ---- IPv6 ----

// Reads the IPv6 address and port; an IPv4-mapped address becomes its IPv4 form. Returns the
// family the address belongs to.
static __always_inline int read6(struct bpf_sock_addr *ctx, struct addr_port *ap)
{
	__builtin_memset(ap, 0, sizeof(*ap));
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	ap->port = (__u16)ctx->user_port;
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
		ap->addr[0] = a3;
		return FAMILY_V4;
	}
	ap->addr[0] = a0;
	ap->addr[1] = a1;
	ap->addr[2] = a2;
	ap->addr[3] = a3;
	return FAMILY_V6;
}

// Writes an address of `family` (IPv4 as mapped) and port back into the IPv6 context.
static __always_inline void write6(struct bpf_sock_addr *ctx, int family, struct addr_port *ap)
{
	if (family == FAMILY_V4) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = ap->addr[0];
	} else {
		ctx->user_ip6[0] = ap->addr[0];
		ctx->user_ip6[1] = ap->addr[1];
		ctx->user_ip6[2] = ap->addr[2];
		ctx->user_ip6[3] = ap->addr[3];
	}
	ctx->user_port = ap->port;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx, int sendmsg)
{
	int proto = proto_of(ctx);
	if (!proto)
		return 1;
	struct addr_port dst;
	int family = read6(ctx, &dst);
	struct svc_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.family = family;
	key.proto = proto;
	key.port = dst.port;
	__builtin_memcpy(key.addr, dst.addr, sizeof(key.addr));
	struct addr_port be;
	switch (lb(ctx, &key, &be, sendmsg)) {
	case REWRITTEN:
		write6(ctx, family, &be);
		return 1;
	case REFUSE:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		return 1;
	}
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	if (!proto_of(ctx))
		return 1;
	struct addr_port peer;
	int family = read6(ctx, &peer);
	struct addr_port *vip = revnat_of(ctx, &peer);
	if (vip) {
		struct addr_port v = *vip;
		write6(ctx, family, &v);
	}
	return 1;
}

SEC("cgroup/connect6")
int sock6_connect(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 0);
}

SEC("cgroup/sendmsg6")
int sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 1);
}

SEC("cgroup/recvmsg6")
int sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

SEC("cgroup/getpeername6")
int sock6_getpeername(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

// No GPL-only helper is used, so the project's own license applies.
char LICENSE[] SEC("license") = "Apache-2.0";

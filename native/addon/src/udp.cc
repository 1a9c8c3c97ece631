// UDP datagram sockets for the soft-RoCE engine (RoCEv2 runs over UDP port
// 4791): one recvmmsg / sendmmsg per call, into and out of memory JS
// preallocated, with no per-datagram allocation on either side.
//
// Datagram records (udpRecvBatch's `meta`, udpSendBatch's `meta`) are
// kUdpMetaWords Uint32 words each; mirrored by UDP_META_* in
// backend/engines/soft-roce/udp-transport.ts:
//   [0] length   received: the datagram's full length (larger than the
//                slot when truncated); send: bytes to send
//   [1] flags    kFlagTruncated | kFlagIpv6
//   [2] port     host order
//   [3] scope    IPv6 scope id (0 for IPv4)
//   [4..7]       address: IPv4 in [4] as a host-order u32 (127.0.0.2 is
//                0x7f000002), [5..7] zero; IPv6 as four big-endian words
//                (the first two bytes of the address are the top of [4]).

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "addon.h"
#include "js.h"

namespace vrdma {

namespace {

using v8::Isolate;
using v8::Local;

constexpr uint32_t kUdpMetaWords = 8;
constexpr uint32_t kFlagTruncated = 1;
constexpr uint32_t kFlagIpv6 = 2;
// UIO_MAXIOV: the kernel handles at most this many messages per call.
constexpr uint32_t kMaxBatch = 1024;
// Asked for; the kernel reports (and may cap) what it gave.
constexpr int kSocketBufferBytes = 8 << 20;

union SockAddr {
  sockaddr base;
  sockaddr_in v4;
  sockaddr_in6 v6;
};

// Per-thread scratch for the mmsghdr arrays: sized once, reused by every
// call, so a batch allocates nothing. Each worker thread gets its own.
struct Scratch {
  std::vector<mmsghdr> msgs;
  std::vector<iovec> iovs;
  std::vector<SockAddr> addrs;
  void Reserve(uint32_t count) {
    if (msgs.size() >= count) return;
    msgs.resize(count);
    iovs.resize(count);
    addrs.resize(count);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Parses "a.b.c.d", "x:y::z" or "fe80::1%eth0" (scope by name or number).
SockAddr ParseAddress(Isolate* isolate, const std::string& text, uint32_t port) {
  SockAddr addr{};
  if (inet_pton(AF_INET, text.c_str(), &addr.v4.sin_addr) == 1) {
    addr.v4.sin_family = AF_INET;
    addr.v4.sin_port = htons(static_cast<uint16_t>(port));
    return addr;
  }
  std::string host = text;
  uint32_t scope = 0;
  size_t percent = text.find('%');
  if (percent != std::string::npos) {
    host = text.substr(0, percent);
    std::string zone = text.substr(percent + 1);
    char* end = nullptr;
    unsigned long number = zone.empty() ? 0 : std::strtoul(zone.c_str(), &end, 10);
    if (!zone.empty() && end != nullptr && *end == '\0') {
      scope = static_cast<uint32_t>(number);
    } else {
      scope = zone.empty() ? 0 : if_nametoindex(zone.c_str());
      if (scope == 0) ThrowSysError(isolate, "if_nametoindex", ENODEV, "'" + zone + "'");
    }
  }
  if (inet_pton(AF_INET6, host.c_str(), &addr.v6.sin6_addr) == 1) {
    addr.v6.sin6_family = AF_INET6;
    addr.v6.sin6_port = htons(static_cast<uint16_t>(port));
    addr.v6.sin6_scope_id = scope;
    return addr;
  }
  ThrowSysError(isolate, "inet_pton", EINVAL, "'" + text + "' is not an IPv4 or IPv6 address");
}

void SetIntOption(Isolate* isolate, int fd, int level, int name, int value, const char* what) {
  if (setsockopt(fd, level, name, &value, sizeof(value)) < 0) {
    ThrowSysError(isolate, "setsockopt", errno, what);
  }
}

int GetIntOption(Isolate* isolate, int fd, int level, int name, const char* what) {
  int value = 0;
  socklen_t len = sizeof(value);
  if (getsockopt(fd, level, name, &value, &len) < 0) {
    ThrowSysError(isolate, "getsockopt", errno, what);
  }
  return value;
}

// The FORCE variants (CAP_NET_ADMIN) may exceed net.core.[rw]mem_max; the
// plain ones are capped there. Either way the kernel says what it gave.
void SetBufferSize(Isolate* isolate, int fd, int force, int plain, const char* what) {
  int value = kSocketBufferBytes;
  if (setsockopt(fd, SOL_SOCKET, force, &value, sizeof(value)) == 0) return;
  SetIntOption(isolate, fd, SOL_SOCKET, plain, value, what);
}

void UdpBind(const Args& args) {
  std::string address = args.String(0, "address");
  uint32_t port = args.Uint32(1, "port");
  if (port > 65535) ThrowRangeError(args.isolate(), "udpBind: port must be at most 65535");
  Isolate* isolate = args.isolate();
  SockAddr addr = ParseAddress(isolate, address, port);
  bool ipv6 = addr.base.sa_family == AF_INET6;

  UniqueFd sock(socket(addr.base.sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (sock.get() < 0) ThrowSysError(isolate, "socket", errno);
  int fd = sock.get();
  // Off (the default, set anyway): a second bind to the same address and
  // port must fail with EADDRINUSE instead of sharing the datagrams.
  SetIntOption(isolate, fd, SOL_SOCKET, SO_REUSEADDR, 0, "SO_REUSEADDR");
  SetBufferSize(isolate, fd, SO_RCVBUFFORCE, SO_RCVBUF, "SO_RCVBUF");
  SetBufferSize(isolate, fd, SO_SNDBUFFORCE, SO_SNDBUF, "SO_SNDBUF");
  if (ipv6) {
    // Like rxe's own tunnel socket: IPv6 only (IPv4 peers use an IPv4
    // socket), and accept a zero UDP checksum, which rxe sends on IPv6.
    SetIntOption(isolate, fd, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
    SetIntOption(isolate, fd, IPPROTO_UDP, UDP_NO_CHECK6_RX, 1, "UDP_NO_CHECK6_RX");
    SetIntOption(isolate, fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO,
                 "IPV6_MTU_DISCOVER");
  } else {
    // rxe sends with DF. With DF on an unconnected socket Linux sends IP ID
    // 0, and both fields are inside the ICRC: always DF, never fragment
    // (a datagram over the path MTU fails with EMSGSIZE), never connect().
    SetIntOption(isolate, fd, IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO, "IP_MTU_DISCOVER");
  }
  socklen_t len = ipv6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  if (bind(fd, &addr.base, len) < 0) {
    ThrowSysError(isolate, "bind", errno, "'" + address + "' port " + std::to_string(port));
  }
  args.Return(sock.release());
}

void UdpInfo(const Args& args) {
  int fd = args.Fd(0, "fd");
  Isolate* isolate = args.isolate();
  SockAddr addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, &addr.base, &len) < 0) ThrowSysError(isolate, "getsockname", errno);
  char text[INET6_ADDRSTRLEN] = {};
  int family = 0;
  uint16_t port = 0;
  if (addr.base.sa_family == AF_INET) {
    family = 4;
    port = ntohs(addr.v4.sin_port);
    inet_ntop(AF_INET, &addr.v4.sin_addr, text, sizeof(text));
  } else if (addr.base.sa_family == AF_INET6) {
    family = 6;
    port = ntohs(addr.v6.sin6_port);
    inet_ntop(AF_INET6, &addr.v6.sin6_addr, text, sizeof(text));
  } else {
    ThrowSysError(isolate, "getsockname", EAFNOSUPPORT, "of a non-IP socket");
  }
  int rcvbuf = GetIntOption(isolate, fd, SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF");
  int sndbuf = GetIntOption(isolate, fd, SOL_SOCKET, SO_SNDBUF, "SO_SNDBUF");

  Local<v8::Context> context = args.context();
  Local<v8::Object> result = v8::Object::New(isolate);
  auto set = [&](const char* key, Local<v8::Value> value) {
    result->Set(context, NewString(isolate, key), value).Check();
  };
  set("family", v8::Integer::New(isolate, family));
  set("address", NewString(isolate, text));
  set("port", v8::Integer::New(isolate, port));
  set("rcvbuf", v8::Integer::New(isolate, rcvbuf));
  set("sndbuf", v8::Integer::New(isolate, sndbuf));
  args.Return(result);
}

Local<v8::Uint32Array> Words(const Args& args, int index, const char* name) {
  Local<v8::Value> value = args.info()[index];
  if (!value->IsUint32Array()) {
    ThrowTypeError(args.isolate(),
                   std::string("The \"") + name + "\" argument must be a Uint32Array");
  }
  return value.As<v8::Uint32Array>();
}

uint32_t* WordsData(Local<v8::Uint32Array> view) {
  void* base = view->Buffer()->Data();
  return base == nullptr ? nullptr
                         : reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(base) +
                                                       view->ByteOffset());
}

void CheckBatch(Isolate* isolate, const char* what, uint32_t count) {
  if (count > kMaxBatch) {
    ThrowRangeError(isolate, std::string(what) + ": at most " + std::to_string(kMaxBatch) +
                                 " datagrams per call");
  }
}

void WriteAddress(const SockAddr& addr, uint32_t* record) {
  if (addr.base.sa_family == AF_INET6) {
    record[1] |= kFlagIpv6;
    record[2] = ntohs(addr.v6.sin6_port);
    record[3] = addr.v6.sin6_scope_id;
    const uint8_t* b = addr.v6.sin6_addr.s6_addr;
    for (int w = 0; w < 4; w++) {
      record[4 + w] = (uint32_t{b[4 * w]} << 24) | (uint32_t{b[4 * w + 1]} << 16) |
                      (uint32_t{b[4 * w + 2]} << 8) | uint32_t{b[4 * w + 3]};
    }
  } else {
    record[2] = ntohs(addr.v4.sin_port);
    record[3] = 0;
    record[4] = ntohl(addr.v4.sin_addr.s_addr);
    record[5] = record[6] = record[7] = 0;
  }
}

socklen_t ReadAddress(const uint32_t* record, SockAddr* addr) {
  std::memset(addr, 0, sizeof(*addr));
  if (record[1] & kFlagIpv6) {
    addr->v6.sin6_family = AF_INET6;
    addr->v6.sin6_port = htons(static_cast<uint16_t>(record[2]));
    addr->v6.sin6_scope_id = record[3];
    uint8_t* b = addr->v6.sin6_addr.s6_addr;
    for (int w = 0; w < 4; w++) {
      uint32_t word = record[4 + w];
      b[4 * w] = static_cast<uint8_t>(word >> 24);
      b[4 * w + 1] = static_cast<uint8_t>(word >> 16);
      b[4 * w + 2] = static_cast<uint8_t>(word >> 8);
      b[4 * w + 3] = static_cast<uint8_t>(word);
    }
    return sizeof(sockaddr_in6);
  }
  addr->v4.sin_family = AF_INET;
  addr->v4.sin_port = htons(static_cast<uint16_t>(record[2]));
  addr->v4.sin_addr.s_addr = htonl(record[4]);
  return sizeof(sockaddr_in);
}

// udpRecvBatch(fd, buf, slotSize, maxPackets, meta) -> count (0 on EAGAIN).
// Datagram i lands at buf[i * slotSize]; a longer one is cut at the slot's
// end and flagged truncated, its record carrying the full length.
void UdpRecvBatch(const Args& args) {
  int fd = args.Fd(0, "fd");
  Local<v8::Uint8Array> buf = args.Bytes(1, "buf");
  uint32_t slotSize = args.Uint32(2, "slotSize");
  uint32_t maxPackets = args.Uint32(3, "maxPackets");
  Local<v8::Uint32Array> meta = Words(args, 4, "meta");
  Isolate* isolate = args.isolate();
  CheckBatch(isolate, "udpRecvBatch", maxPackets);
  if (slotSize == 0) ThrowRangeError(isolate, "udpRecvBatch: slotSize must be at least 1");
  CheckRange(isolate, "udpRecvBatch buf", 0, uint64_t{slotSize} * maxPackets, buf->ByteLength());
  CheckRange(isolate, "udpRecvBatch meta", 0, uint64_t{kUdpMetaWords} * maxPackets,
             meta->Length());
  if (maxPackets == 0) return args.Return(0);

  Scratch& s = ThreadScratch();
  s.Reserve(maxPackets);
  uint8_t* base = ViewData(buf);
  for (uint32_t i = 0; i < maxPackets; i++) {
    s.iovs[i] = iovec{base + size_t{i} * slotSize, slotSize};
    msghdr& h = s.msgs[i].msg_hdr;
    h = msghdr{};
    h.msg_name = &s.addrs[i];
    h.msg_namelen = sizeof(SockAddr);
    h.msg_iov = &s.iovs[i];
    h.msg_iovlen = 1;
    s.msgs[i].msg_len = 0;
  }
  // MSG_TRUNC: msg_len is the datagram's real length even when cut short.
  int got = RetryOnEintr(
      [&] { return recvmmsg(fd, s.msgs.data(), maxPackets, MSG_DONTWAIT | MSG_TRUNC, nullptr); });
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return args.Return(0);
    ThrowSysError(isolate, "recvmmsg", errno);
  }
  uint32_t* words = WordsData(meta);
  for (int i = 0; i < got; i++) {
    uint32_t* record = words + size_t{static_cast<uint32_t>(i)} * kUdpMetaWords;
    const mmsghdr& m = s.msgs[i];
    record[0] = m.msg_len;
    record[1] = ((m.msg_hdr.msg_flags & MSG_TRUNC) != 0 || m.msg_len > slotSize)
                    ? kFlagTruncated
                    : 0;
    WriteAddress(s.addrs[i], record);
  }
  args.Return(got);
}

// udpSendBatch(fd, buf, offsets, meta, first, count) -> datagrams sent (0 on
// EAGAIN). Datagram i (first <= i < first + count) is meta[i]'s length bytes
// of buf at offsets[i], to meta[i]'s address. A failure of the first
// datagram throws (EMSGSIZE, ENETUNREACH...); one of a later datagram ends
// the batch early and is reported by the next call, which starts there.
void UdpSendBatch(const Args& args) {
  int fd = args.Fd(0, "fd");
  Local<v8::Uint8Array> buf = args.Bytes(1, "buf");
  Local<v8::Uint32Array> offsets = Words(args, 2, "offsets");
  Local<v8::Uint32Array> meta = Words(args, 3, "meta");
  uint32_t first = args.Uint32(4, "first");
  uint32_t count = args.Uint32(5, "count");
  Isolate* isolate = args.isolate();
  CheckBatch(isolate, "udpSendBatch", count);
  CheckRange(isolate, "udpSendBatch offsets", first, count, offsets->Length());
  CheckRange(isolate, "udpSendBatch meta", uint64_t{first} * kUdpMetaWords,
             uint64_t{count} * kUdpMetaWords, meta->Length());
  if (count == 0) return args.Return(0);

  Scratch& s = ThreadScratch();
  s.Reserve(count);
  uint8_t* base = ViewData(buf);
  size_t limit = buf->ByteLength();
  const uint32_t* offs = WordsData(offsets);
  const uint32_t* words = WordsData(meta);
  for (uint32_t i = 0; i < count; i++) {
    const uint32_t* record = words + size_t{first + i} * kUdpMetaWords;
    uint32_t offset = offs[first + i];
    CheckRange(isolate, "udpSendBatch datagram", offset, record[0], limit);
    s.iovs[i] = iovec{base + offset, record[0]};
    msghdr& h = s.msgs[i].msg_hdr;
    h = msghdr{};
    h.msg_name = &s.addrs[i];
    h.msg_namelen = ReadAddress(record, &s.addrs[i]);
    h.msg_iov = &s.iovs[i];
    h.msg_iovlen = 1;
    s.msgs[i].msg_len = 0;
  }
  int sent = RetryOnEintr(
      [&] { return sendmmsg(fd, s.msgs.data(), count, MSG_DONTWAIT | MSG_NOSIGNAL); });
  if (sent < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return args.Return(0);
    ThrowSysError(isolate, "sendmmsg", errno);
  }
  args.Return(sent);
}

}  // namespace

void RegisterUdp(Local<v8::Context> context, Local<v8::Object> exports) {
  SetMethod(context, exports, "udpBind", Bind<UdpBind>);
  SetMethod(context, exports, "udpInfo", Bind<UdpInfo>);
  SetMethod(context, exports, "udpRecvBatch", Bind<UdpRecvBatch>);
  SetMethod(context, exports, "udpSendBatch", Bind<UdpSendBatch>);
}

}  // namespace vrdma

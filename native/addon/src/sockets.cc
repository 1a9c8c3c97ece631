// Unix stream sockets with descriptor passing: the vhost-user transport.

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "addon.h"
#include "js.h"

namespace vrdma {

namespace {

using v8::Isolate;
using v8::Local;

// The contract's limit; vhost-user itself never sends more than 8.
constexpr size_t kMaxSendFds = 32;
// SCM_MAX_FD: the kernel never delivers more in one message.
constexpr uint32_t kMaxRecvFds = 253;

struct UnixAddress {
  sockaddr_un addr{};
  socklen_t length = 0;
};

UnixAddress MakeAddress(Isolate* isolate, const std::string& path, const char* syscall) {
  UnixAddress result;
  result.addr.sun_family = AF_UNIX;
  // An empty path would ask the kernel to autobind an abstract address.
  if (path.empty()) ThrowSysError(isolate, syscall, ENOENT, "of an empty path");
  if (path.size() >= sizeof(result.addr.sun_path)) {
    ThrowSysError(isolate, syscall, ENAMETOOLONG, "'" + path + "'");
  }
  std::memcpy(result.addr.sun_path, path.data(), path.size());
  result.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return result;
}

int NewStreamSocket(Isolate* isolate, int flags) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
  if (fd < 0) ThrowSysError(isolate, "socket", errno);
  return fd;
}

void SetNonBlocking(Isolate* isolate, int fd) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    ThrowSysError(isolate, "fcntl", errno);
  }
}

// connect(2) is never restarted after a signal: the connection carries on in
// the background, so wait for it and collect its result.
void FinishInterruptedConnect(Isolate* isolate, int fd, const std::string& path) {
  pollfd pfd{fd, POLLOUT, 0};
  if (RetryOnEintr([&] { return poll(&pfd, 1, -1); }) < 0) ThrowSysError(isolate, "poll", errno);
  int err = 0;
  socklen_t len = sizeof(err);
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
    ThrowSysError(isolate, "getsockopt", errno);
  }
  if (err != 0) ThrowSysError(isolate, "connect", err, "'" + path + "'");
}

void UnixListen(const Args& args) {
  std::string path = args.String(0, "path");
  int backlog = args.Int32(1, "backlog");
  UnixAddress address = MakeAddress(args.isolate(), path, "bind");
  UniqueFd sock(NewStreamSocket(args.isolate(), SOCK_NONBLOCK));
  // No unlink of a stale socket file: whether it is stale is the caller's call.
  if (bind(sock.get(), reinterpret_cast<sockaddr*>(&address.addr), address.length) < 0) {
    ThrowSysError(args.isolate(), "bind", errno, "'" + path + "'");
  }
  if (listen(sock.get(), backlog) < 0) ThrowSysError(args.isolate(), "listen", errno);
  args.Return(sock.release());
}

void UnixAccept(const Args& args) {
  int listenFd = args.Fd(0, "listenFd");
  for (;;) {
    int fd = accept4(listenFd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) return args.Return(fd);
    // A connection that was reset while queued: look for the next one.
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return args.ReturnNull();
    ThrowSysError(args.isolate(), "accept4", errno);
  }
}

void UnixConnect(const Args& args) {
  std::string path = args.String(0, "path");
  UnixAddress address = MakeAddress(args.isolate(), path, "connect");
  // Blocking while connecting, so the caller gets a connected socket or an error.
  UniqueFd sock(NewStreamSocket(args.isolate(), 0));
  if (connect(sock.get(), reinterpret_cast<sockaddr*>(&address.addr), address.length) < 0) {
    if (errno != EINTR) ThrowSysError(args.isolate(), "connect", errno, "'" + path + "'");
    FinishInterruptedConnect(args.isolate(), sock.get(), path);
  }
  SetNonBlocking(args.isolate(), sock.get());
  args.Return(sock.release());
}

void SocketPair(const Args& args) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0) {
    ThrowSysError(args.isolate(), "socketpair", errno);
  }
  Isolate* isolate = args.isolate();
  Local<v8::Value> pair[] = {v8::Integer::New(isolate, fds[0]), v8::Integer::New(isolate, fds[1])};
  args.Return(v8::Array::New(isolate, pair, 2));
}

std::vector<int> FdList(const Args& args, int index) {
  Local<v8::Array> list = args.Array(index, "fds");
  if (list->Length() > kMaxSendFds) {
    ThrowRangeError(args.isolate(), "sendMsg: at most " + std::to_string(kMaxSendFds) +
                                        " fds per message (got " +
                                        std::to_string(list->Length()) + ")");
  }
  std::vector<int> fds;
  for (uint32_t i = 0; i < list->Length(); i++) {
    Local<v8::Value> item;
    if (!list->Get(args.context(), i).ToLocal(&item)) throw PendingJsException{};
    if (!item->IsInt32()) ThrowTypeError(args.isolate(), "sendMsg: fds must be integers");
    fds.push_back(item.As<v8::Int32>()->Value());
  }
  return fds;
}

void SendMsg(const Args& args) {
  int fd = args.Fd(0, "fd");
  // Read the fd list first: an array getter could run JS that detaches `data`.
  std::vector<int> fds = FdList(args, 2);
  Local<v8::Uint8Array> data = args.Bytes(1, "data");
  size_t length = data->ByteLength();
  // A stream socket sends nothing, ancillary data included, for 0 bytes.
  if (length == 0 && !fds.empty()) {
    ThrowRangeError(args.isolate(), "sendMsg: fds need at least one byte of data to ride on");
  }

  iovec iov{ViewData(data), length};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxSendFds)] = {};
  if (!fds.empty()) {
    size_t fdBytes = sizeof(int) * fds.size();
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(fdBytes);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fdBytes);
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fdBytes);
  }

  // MSG_DONTWAIT: a full socket throws EAGAIN even if the fd is blocking.
  ssize_t sent = RetryOnEintr([&] { return sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); });
  if (sent < 0) ThrowSysError(args.isolate(), "sendmsg", errno);
  args.Return(static_cast<double>(sent));
}

std::vector<int> ReceivedFds(msghdr* msg) {
  std::vector<int> fds;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* data = CMSG_DATA(cmsg);
    for (size_t i = 0; i < count; i++) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
      fds.push_back(fd);
    }
  }
  return fds;
}

Local<v8::Object> RecvResult(Isolate* isolate, ssize_t bytes, const std::vector<int>& fds,
                             bool truncated) {
  Local<v8::Context> context = isolate->GetCurrentContext();
  Local<v8::Array> fdArray = v8::Array::New(isolate, static_cast<int>(fds.size()));
  for (size_t i = 0; i < fds.size(); i++) {
    fdArray->Set(context, static_cast<uint32_t>(i), v8::Integer::New(isolate, fds[i])).Check();
  }
  Local<v8::Object> result = v8::Object::New(isolate);
  result->Set(context, NewString(isolate, "bytes"), v8::Number::New(isolate, bytes)).Check();
  result->Set(context, NewString(isolate, "fds"), fdArray).Check();
  result->Set(context, NewString(isolate, "truncated"), v8::Boolean::New(isolate, truncated))
      .Check();
  return result;
}

void RecvMsg(const Args& args) {
  int fd = args.Fd(0, "fd");
  Local<v8::Uint8Array> buf = args.Bytes(1, "buf");
  uint64_t offset = args.Index(2, "offset");
  uint64_t length = args.Index(3, "length");
  uint32_t maxFds = args.Uint32(4, "maxFds");
  CheckRange(args.isolate(), "recvMsg", offset, length, buf->ByteLength());
  // A 0-byte read returns 0, which callers rightly take for end of stream.
  if (length == 0) ThrowRangeError(args.isolate(), "recvMsg: length must be at least 1");
  if (maxFds > kMaxRecvFds) {
    ThrowRangeError(args.isolate(),
                    "recvMsg: maxFds must be at most " + std::to_string(kMaxRecvFds));
  }

  iovec iov{ViewData(buf) + offset, length};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxRecvFds)];
  if (maxFds > 0) {
    // CMSG_LEN, not CMSG_SPACE: the padding of CMSG_SPACE has room for one
    // more fd, and the kernel fills whatever room there is.
    msg.msg_control = control;
    msg.msg_controllen = CMSG_LEN(sizeof(int) * maxFds);
  }

  ssize_t got =
      RetryOnEintr([&] { return recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return args.ReturnNull();
    ThrowSysError(args.isolate(), "recvmsg", errno);
  }

  std::vector<int> fds = ReceivedFds(&msg);
  // Some fds were dropped: the survivors cannot be matched to what the peer
  // meant to send, so none of them is handed out.
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0 || fds.size() > maxFds;
  if (truncated) {
    for (int received : fds) ::close(received);
    fds.clear();
  }
  args.Return(RecvResult(args.isolate(), got, fds, truncated));
}

void Close(const Args& args) {
  int fd = args.Fd(0, "fd");
  // On Linux the fd is gone even when close() reports EINTR; retrying could
  // close an fd another thread has just been given.
  if (::close(fd) < 0 && errno != EINTR) ThrowSysError(args.isolate(), "close", errno);
}

// poll(2) timeout for the time left until `deadline`; -1 waits forever.
int RemainingMs(bool forever, std::chrono::steady_clock::time_point deadline) {
  if (forever) return -1;
  auto left =
      std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return 0;
  return left.count() > INT_MAX ? INT_MAX : static_cast<int>(left.count());
}

void WaitReadable(const Args& args) {
  int fd = args.Fd(0, "fd");
  double timeoutMs = args.Number(1, "timeoutMs");
  bool forever = std::isnan(timeoutMs) || timeoutMs < 0 || std::isinf(timeoutMs);
  auto wait = std::chrono::milliseconds(forever ? 0 : static_cast<int64_t>(std::ceil(timeoutMs)));
  auto deadline = std::chrono::steady_clock::now() + wait;

  pollfd pfd{fd, POLLIN, 0};
  for (;;) {
    int ready = poll(&pfd, 1, RemainingMs(forever, deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) ThrowSysError(args.isolate(), "poll", errno);
    if (ready == 0) return args.Return(false);
    if (pfd.revents & POLLNVAL) ThrowSysError(args.isolate(), "poll", EBADF);
    // POLLHUP and POLLERR count too: a read would not block.
    return args.Return(true);
  }
}

}  // namespace

void RegisterSockets(Local<v8::Context> context, Local<v8::Object> exports) {
  SetMethod(context, exports, "unixListen", Bind<UnixListen>);
  SetMethod(context, exports, "unixAccept", Bind<UnixAccept>);
  SetMethod(context, exports, "unixConnect", Bind<UnixConnect>);
  SetMethod(context, exports, "socketPair", Bind<SocketPair>);
  SetMethod(context, exports, "sendMsg", Bind<SendMsg>);
  SetMethod(context, exports, "recvMsg", Bind<RecvMsg>);
  SetMethod(context, exports, "close", Bind<Close>);
  SetMethod(context, exports, "waitReadable", Bind<WaitReadable>);
}

}  // namespace vrdma

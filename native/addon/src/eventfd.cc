// eventfd counters: the kick and call notifiers of vhost-user virtqueues.

#include <sys/eventfd.h>
#include <unistd.h>

#include "addon.h"
#include "js.h"

namespace vrdma {

namespace {

void Eventfd(const Args& args) {
  uint32_t initval = args.Uint32(0, "initval");
  int fd = eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) ThrowSysError(args.isolate(), "eventfd", errno);
  args.Return(fd);
}

void EventfdRead(const Args& args) {
  int fd = args.Fd(0, "fd");
  uint64_t value = 0;
  ssize_t got = RetryOnEintr([&] { return read(fd, &value, sizeof(value)); });
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return args.ReturnNull();
    ThrowSysError(args.isolate(), "read", errno);
  }
  // An eventfd always yields exactly 8 bytes; anything else is another kind of fd.
  if (got != sizeof(value)) {
    ThrowSysError(args.isolate(), "read", EINVAL,
                  "returned " + std::to_string(got) + " bytes (not an eventfd?)");
  }
  args.Return(v8::BigInt::NewFromUnsigned(args.isolate(), value));
}

void EventfdWrite(const Args& args) {
  int fd = args.Fd(0, "fd");
  uint64_t value = args.Index(1, "value");
  ssize_t put = RetryOnEintr([&] { return write(fd, &value, sizeof(value)); });
  // EAGAIN here means the counter would overflow; the caller must hear of it.
  if (put < 0) ThrowSysError(args.isolate(), "write", errno);
  if (put != sizeof(value)) {
    ThrowSysError(args.isolate(), "write", EINVAL,
                  "took " + std::to_string(put) + " bytes (not an eventfd?)");
  }
}

}  // namespace

void RegisterEventfd(v8::Local<v8::Context> context, v8::Local<v8::Object> exports) {
  SetMethod(context, exports, "eventfd", Bind<Eventfd>);
  SetMethod(context, exports, "eventfdRead", Bind<EventfdRead>);
  SetMethod(context, exports, "eventfdWrite", Bind<EventfdWrite>);
}

}  // namespace vrdma

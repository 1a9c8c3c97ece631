// Helpers shared by every binding: argument checking, error throwing and
// return values, written against the V8 API (see native/README.md for why
// the addon does not use N-API).
#pragma once

#include <node.h>

#include <cerrno>
#include <cstdint>
#include <string>

namespace vrdma {

// Thrown (as a C++ exception) once a JS exception has been scheduled on the
// isolate. It lets argument checks and syscall failures deep in a binding
// unwind straight to Bind(), which returns to V8 with the JS exception set.
// It never crosses a V8 frame: Bind() is the only catcher and it sits
// directly below V8.
struct PendingJsException {};

// Schedules `Error("<syscall> <context>: <strerror> (<CODE>)")` with `code`,
// `errno` and `syscall` properties, then throws PendingJsException.
[[noreturn]] void ThrowSysError(v8::Isolate* isolate, const char* syscall, int err,
                                const std::string& context = "");
[[noreturn]] void ThrowTypeError(v8::Isolate* isolate, const std::string& message);
[[noreturn]] void ThrowRangeError(v8::Isolate* isolate, const std::string& message);

// Throws RangeError unless [offset, offset + length) lies within [0, limit).
void CheckRange(v8::Isolate* isolate, const char* what, uint64_t offset, uint64_t length,
                size_t limit);

// Address of the first byte a Uint8Array views, for plain and shared
// buffers alike. Buffer() moves a small on-heap array's bytes off the heap,
// so the pointer stays valid until JS runs again.
uint8_t* ViewData(v8::Local<v8::Uint8Array> view);

v8::Local<v8::String> NewString(v8::Isolate* isolate, const std::string& text);

// Typed access to a binding's arguments. Each accessor throws TypeError for
// the wrong JS type and RangeError for a number outside the accepted range.
class Args {
 public:
  explicit Args(const v8::FunctionCallbackInfo<v8::Value>& info)
      : info_(info), isolate_(info.GetIsolate()) {}

  v8::Isolate* isolate() const { return isolate_; }
  v8::Local<v8::Context> context() const { return isolate_->GetCurrentContext(); }
  const v8::FunctionCallbackInfo<v8::Value>& info() const { return info_; }

  // Any int32: negative values reach the kernel, which reports EBADF.
  int Fd(int index, const char* name) const;
  int32_t Int32(int index, const char* name) const;
  uint32_t Uint32(int index, const char* name) const;
  // A non-negative safe integer (offsets, sizes, counters).
  uint64_t Index(int index, const char* name) const;
  double Number(int index, const char* name) const;
  bool Bool(int index, const char* name) const;
  // UTF-8; embedded NULs are refused because every string goes to a C API.
  std::string String(int index, const char* name) const;
  v8::Local<v8::Uint8Array> Bytes(int index, const char* name) const;
  v8::Local<v8::SharedArrayBuffer> Shared(int index, const char* name) const;
  v8::Local<v8::Array> Array(int index, const char* name) const;
  v8::Local<v8::Function> Function(int index, const char* name) const;

  void Return(v8::Local<v8::Value> value) const { info_.GetReturnValue().Set(value); }
  void Return(int32_t value) const { info_.GetReturnValue().Set(value); }
  void Return(double value) const { info_.GetReturnValue().Set(value); }
  void Return(bool value) const { info_.GetReturnValue().Set(value); }
  void ReturnNull() const { info_.GetReturnValue().SetNull(); }

 private:
  [[noreturn]] void WrongType(int index, const char* name, const char* expected) const;

  const v8::FunctionCallbackInfo<v8::Value>& info_;
  v8::Isolate* isolate_;
};

using Binding = void (*)(const Args& args);

// The V8 entry point for a binding: converts PendingJsException into a
// normal return (the JS exception is already scheduled).
template <Binding fn>
void Bind(const v8::FunctionCallbackInfo<v8::Value>& info) {
  try {
    fn(Args(info));
  } catch (const PendingJsException&) {
  }
}

void SetMethod(v8::Local<v8::Context> context, v8::Local<v8::Object> target, const char* name,
               v8::FunctionCallback callback);

// Retries a syscall interrupted by a signal; returns its last result.
template <typename Call>
auto RetryOnEintr(Call call) {
  decltype(call()) result;
  do {
    result = call();
  } while (result == -1 && errno == EINTR);
  return result;
}

// Owns a file descriptor until release(), so a failure between creating an
// fd and handing it to JS cannot leak it.
class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

}  // namespace vrdma

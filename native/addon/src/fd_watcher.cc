// FdWatcher: readiness callbacks for an fd, driven by a uv_poll_t on the
// Node event loop.
//
// Lifetime rules:
//  * The JS object holds the callback (internal field), so nothing in C++
//    roots it: a callback that closes over its watcher is not a leak.
//  * While started, the C++ side holds the JS object strongly, so a watcher
//    nobody references keeps firing; while stopped it is held weakly, and a
//    forgotten watcher is closed when it is garbage collected.
//  * The C++ object is freed only in the uv_close callback, because libuv
//    owns the uv_poll_t until then.
//  * Watchers still open when the environment (main thread or worker) shuts
//    down are closed by a cleanup hook: a worker's loop must have no open
//    handles when it is torn down.

#include <uv.h>

#include <unordered_set>

#include "addon.h"
#include "js.h"

namespace vrdma {

namespace {

using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::Value;

// Mirrors POLL_READABLE / POLL_WRITABLE / POLL_DISCONNECT in native.ts.
constexpr int kReadable = 1;
constexpr int kWritable = 2;
constexpr int kDisconnect = 4;

constexpr int kSelfField = 0;      // FdWatcher*, null once closed
constexpr int kCallbackField = 1;  // the JS callback

class FdWatcher;

// Per environment: the open watchers, for the cleanup hook.
struct WatcherEnv {
  Isolate* isolate;
  uv_loop_t* loop;
  std::unordered_set<FdWatcher*> open;
};

class FdWatcher {
 public:
  // Returns a libuv error (negative) instead of creating the watcher.
  static int Create(WatcherEnv* env, Local<Object> self, int fd, FdWatcher** out);

  int fd() const { return fd_; }
  bool started() const { return started_; }

  int Start(int uvEvents);
  void Stop();
  // Stops watching and releases the handle; safe to call more than once.
  void Close();

 private:
  FdWatcher(WatcherEnv* env, int fd) : env_(env), fd_(fd) {}

  void Dispatch(int status, int uvEvents);
  void HoldWeakly();

  static void OnPoll(uv_poll_t* handle, int status, int uvEvents);
  static void OnClosed(uv_handle_t* handle);
  static void OnCollected(const v8::WeakCallbackInfo<FdWatcher>& info);

  uv_poll_t poll_{};
  WatcherEnv* env_;
  int fd_;
  v8::Global<Object> self_;
  bool started_ = false;
  bool closed_ = false;
};

int FdWatcher::Create(WatcherEnv* env, Local<Object> self, int fd, FdWatcher** out) {
  auto* watcher = new FdWatcher(env, fd);
  // On failure libuv has not taken the handle, so it can simply be freed.
  int err = uv_poll_init(env->loop, &watcher->poll_, fd);
  if (err != 0) {
    delete watcher;
    return err;
  }
  watcher->poll_.data = watcher;
  watcher->self_.Reset(env->isolate, self);
  watcher->HoldWeakly();
  env->open.insert(watcher);
  *out = watcher;
  return 0;
}

int FdWatcher::Start(int uvEvents) {
  int err = uv_poll_start(&poll_, uvEvents, OnPoll);
  if (err != 0) return err;
  if (!started_) self_.ClearWeak();
  started_ = true;
  return 0;
}

void FdWatcher::Stop() {
  uv_poll_stop(&poll_);
  if (started_) HoldWeakly();
  started_ = false;
}

void FdWatcher::Close() {
  if (closed_) return;
  closed_ = true;
  started_ = false;
  env_->open.erase(this);
  self_.Reset();
  uv_close(reinterpret_cast<uv_handle_t*>(&poll_), OnClosed);
}

void FdWatcher::HoldWeakly() {
  self_.SetWeak(this, OnCollected, v8::WeakCallbackType::kParameter);
}

int EventMask(int status, int uvEvents) {
  int events = 0;
  if (uvEvents & UV_READABLE) events |= kReadable;
  if (uvEvents & UV_WRITABLE) events |= kWritable;
  // A poll error (e.g. POLLERR on a reset socket) ends the fd's useful life
  // just as a hang-up does.
  if ((uvEvents & UV_DISCONNECT) || status < 0) events |= kDisconnect;
  return events;
}

void FdWatcher::OnPoll(uv_poll_t* handle, int status, int uvEvents) {
  static_cast<FdWatcher*>(handle->data)->Dispatch(status, uvEvents);
}

void FdWatcher::Dispatch(int status, int uvEvents) {
  Isolate* isolate = env_->isolate;
  v8::HandleScope scope(isolate);
  Local<Object> self = self_.Get(isolate);
  if (self.IsEmpty()) return;
  // libuv stops the handle itself after reporting an error.
  if (status < 0 && started_) {
    started_ = false;
    HoldWeakly();  // `self` keeps the object alive for the callback below
  }
  Local<Value> callback = self->GetInternalField(kCallbackField);
  if (!callback->IsFunction()) return;
  Local<Value> argv[] = {v8::Integer::New(isolate, EventMask(status, uvEvents))};
  // MakeCallback, not Function::Call: it drains process.nextTick and
  // microtasks afterwards and routes a throw to 'uncaughtException'.
  (void)node::MakeCallback(isolate, self, callback.As<v8::Function>(), 1, argv,
                           node::async_context{0, 0});
}

void FdWatcher::OnClosed(uv_handle_t* handle) {
  delete static_cast<FdWatcher*>(handle->data);
}

// A first-pass weak callback may only reset the handle and do non-V8 work;
// closing the uv handle is exactly that.
void FdWatcher::OnCollected(const v8::WeakCallbackInfo<FdWatcher>& info) {
  info.GetParameter()->Close();
}

void CloseAll(void* data) {
  auto* env = static_cast<WatcherEnv*>(data);
  // Close() edits the set, so walk a copy.
  std::unordered_set<FdWatcher*> open = env->open;
  for (FdWatcher* watcher : open) watcher->Close();
  delete env;
}

WatcherEnv* EnvOf(const Args& args) {
  return static_cast<WatcherEnv*>(args.info().Data().As<v8::External>()->Value());
}

// The receiver is guaranteed to be an FdWatcher by the methods' signature;
// its pointer is null once closed.
FdWatcher* Unwrap(const Args& args) {
  return static_cast<FdWatcher*>(
      args.info().This()->GetAlignedPointerFromInternalField(kSelfField));
}

void New(const Args& args) {
  if (!args.info().IsConstructCall()) {
    ThrowTypeError(args.isolate(), "Class constructor FdWatcher cannot be invoked without 'new'");
  }
  int fd = args.Fd(0, "fd");
  Local<v8::Function> callback = args.Function(1, "callback");
  Local<Object> self = args.info().This();
  // Fields start out undefined; Unwrap must read null if creation fails.
  self->SetAlignedPointerInInternalField(kSelfField, nullptr);
  FdWatcher* watcher = nullptr;
  int err = FdWatcher::Create(EnvOf(args), self, fd, &watcher);
  if (err != 0) ThrowSysError(args.isolate(), "uv_poll_init", -err);
  self->SetAlignedPointerInInternalField(kSelfField, watcher);
  self->SetInternalField(kCallbackField, callback);
}

// libuv silently delivers an fd's events to only one of two started
// watchers, so a second one is refused.
void CheckNoOtherWatcher(const Args& args, FdWatcher* watcher) {
  for (FdWatcher* other : EnvOf(args)->open) {
    if (other != watcher && other->started() && other->fd() == watcher->fd()) {
      ThrowSysError(args.isolate(), "uv_poll_start", EEXIST,
                    "on fd " + std::to_string(watcher->fd()) +
                        " (another FdWatcher is started on it)");
    }
  }
}

void Start(const Args& args) {
  FdWatcher* watcher = Unwrap(args);
  if (watcher == nullptr) {
    ThrowSysError(args.isolate(), "uv_poll_start", EBADF, "on a closed FdWatcher");
  }
  uint32_t events = args.Uint32(0, "events");
  if (events == 0 || (events & ~uint32_t{kReadable | kWritable}) != 0) {
    ThrowRangeError(args.isolate(),
                    "FdWatcher.start: events must be POLL_READABLE, POLL_WRITABLE or both");
  }
  CheckNoOtherWatcher(args, watcher);
  // Always ask for hang-ups: they are reported whatever the caller watches.
  int uvEvents = UV_DISCONNECT;
  if (events & kReadable) uvEvents |= UV_READABLE;
  if (events & kWritable) uvEvents |= UV_WRITABLE;
  int err = watcher->Start(uvEvents);
  if (err != 0) ThrowSysError(args.isolate(), "uv_poll_start", -err);
}

void Stop(const Args& args) {
  FdWatcher* watcher = Unwrap(args);
  if (watcher != nullptr) watcher->Stop();
}

void Close(const Args& args) {
  FdWatcher* watcher = Unwrap(args);
  if (watcher == nullptr) return;
  Local<Object> self = args.info().This();
  self->SetAlignedPointerInInternalField(kSelfField, nullptr);
  self->SetInternalField(kCallbackField, v8::Undefined(args.isolate()));
  watcher->Close();
}

void AddMethod(Isolate* isolate, Local<v8::FunctionTemplate> cls, Local<v8::External> data,
               const char* name, v8::FunctionCallback callback) {
  // The signature makes V8 reject receivers that are not FdWatchers, so
  // Unwrap never reads internal fields of a foreign object.
  Local<v8::FunctionTemplate> method = v8::FunctionTemplate::New(
      isolate, callback, data, v8::Signature::New(isolate, cls), 0,
      v8::ConstructorBehavior::kThrow);
  cls->PrototypeTemplate()->Set(NewString(isolate, name), method);
}

}  // namespace

void RegisterFdWatcher(Local<v8::Context> context, Local<Object> exports) {
  Isolate* isolate = context->GetIsolate();
  auto* env = new WatcherEnv{isolate, node::GetCurrentEventLoop(isolate), {}};
  node::AddEnvironmentCleanupHook(isolate, CloseAll, env);

  Local<v8::External> data = v8::External::New(isolate, env);
  Local<v8::FunctionTemplate> cls = v8::FunctionTemplate::New(isolate, Bind<New>, data);
  Local<v8::String> name = NewString(isolate, "FdWatcher");
  cls->SetClassName(name);
  cls->InstanceTemplate()->SetInternalFieldCount(2);
  AddMethod(isolate, cls, data, "start", Bind<Start>);
  AddMethod(isolate, cls, data, "stop", Bind<Stop>);
  AddMethod(isolate, cls, data, "close", Bind<Close>);
  exports->Set(context, name, cls->GetFunction(context).ToLocalChecked()).Check();
}

}  // namespace vrdma

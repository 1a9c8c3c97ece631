// Module entry point. Context-aware (NODE_MODULE_INIT) so worker threads can
// load it too: nothing here is per-process except the mapping registry,
// which is shared on purpose (a SharedArrayBuffer can move between threads).

#include "addon.h"

namespace vrdma {
// src/udp.cc: UDP datagram batches for the soft-RoCE engine.
void RegisterUdp(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);
}  // namespace vrdma

NODE_MODULE_INIT(/* exports, module, context */) {
  vrdma::RegisterSockets(context, exports);
  vrdma::RegisterMemory(context, exports);
  vrdma::RegisterEventfd(context, exports);
  vrdma::RegisterFdWatcher(context, exports);
  vrdma::RegisterUdp(context, exports);
  vrdma::RegisterCrc32(context, exports);
}

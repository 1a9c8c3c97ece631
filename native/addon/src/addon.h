// Each group of bindings registers its functions on the module's exports.
#pragma once

#include <node.h>

namespace vrdma {

void RegisterSockets(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);
void RegisterMemory(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);
void RegisterEventfd(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);
void RegisterFdWatcher(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);
void RegisterCrc32(v8::Local<v8::Context> context, v8::Local<v8::Object> exports);

}  // namespace vrdma

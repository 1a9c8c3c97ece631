#include "js.h"

#include <unistd.h>

#include <cmath>
#include <cstring>

namespace vrdma {

namespace {

using v8::Exception;
using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::Value;

// Number.MAX_SAFE_INTEGER: beyond it a JS number cannot name every byte.
constexpr double kMaxSafeInteger = 9007199254740991.0;

std::string ErrnoName(int err) {
  // glibc >= 2.32; it returns null for numbers it does not know.
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : "E" + std::to_string(err);
}

std::string ErrnoDescription(int err) {
  // Unlike strerror(), thread-safe and not localised.
  const char* text = strerrordesc_np(err);
  return text != nullptr ? text : "Unknown error " + std::to_string(err);
}

void SetProperty(Isolate* isolate, Local<Object> target, const char* key, Local<Value> value) {
  target->Set(isolate->GetCurrentContext(), NewString(isolate, key), value).Check();
}

std::string Describe(Isolate* isolate, Local<Value> value) {
  v8::String::Utf8Value type(isolate, value->TypeOf(isolate));
  return *type != nullptr ? *type : "unknown";
}

}  // namespace

Local<v8::String> NewString(Isolate* isolate, const std::string& text) {
  return v8::String::NewFromUtf8(isolate, text.data(), v8::NewStringType::kNormal,
                                 static_cast<int>(text.size()))
      .ToLocalChecked();
}

void ThrowSysError(Isolate* isolate, const char* syscall, int err, const std::string& context) {
  std::string code = ErrnoName(err);
  std::string message = syscall;
  if (!context.empty()) message += " " + context;
  message += ": " + ErrnoDescription(err) + " (" + code + ")";

  Local<Object> error = Exception::Error(NewString(isolate, message)).As<Object>();
  SetProperty(isolate, error, "code", NewString(isolate, code));
  SetProperty(isolate, error, "errno", v8::Integer::New(isolate, err));
  SetProperty(isolate, error, "syscall", NewString(isolate, syscall));
  isolate->ThrowException(error);
  throw PendingJsException{};
}

void ThrowTypeError(Isolate* isolate, const std::string& message) {
  isolate->ThrowException(Exception::TypeError(NewString(isolate, message)));
  throw PendingJsException{};
}

void ThrowRangeError(Isolate* isolate, const std::string& message) {
  isolate->ThrowException(Exception::RangeError(NewString(isolate, message)));
  throw PendingJsException{};
}

void CheckRange(Isolate* isolate, const char* what, uint64_t offset, uint64_t length,
                size_t limit) {
  if (offset > limit || length > limit - offset) {
    ThrowRangeError(isolate, std::string(what) + ": offset " + std::to_string(offset) +
                                 " + length " + std::to_string(length) + " exceeds its " +
                                 std::to_string(limit) + " bytes");
  }
}

uint8_t* ViewData(Local<v8::Uint8Array> view) {
  // A detached or empty buffer may have no storage at all.
  void* base = view->Buffer()->Data();
  return base == nullptr ? nullptr : static_cast<uint8_t*>(base) + view->ByteOffset();
}

void SetMethod(Local<v8::Context> context, Local<Object> target, const char* name,
               v8::FunctionCallback callback) {
  Isolate* isolate = context->GetIsolate();
  Local<v8::Function> fn = v8::Function::New(context, callback).ToLocalChecked();
  Local<v8::String> key = NewString(isolate, name);
  fn->SetName(key);
  target->Set(context, key, fn).Check();
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

void Args::WrongType(int index, const char* name, const char* expected) const {
  ThrowTypeError(isolate_, std::string("The \"") + name + "\" argument must be " + expected +
                               " (received " + Describe(isolate_, info_[index]) + ")");
}

int Args::Fd(int index, const char* name) const {
  if (!info_[index]->IsInt32()) WrongType(index, name, "an integer file descriptor");
  return info_[index].As<v8::Int32>()->Value();
}

int32_t Args::Int32(int index, const char* name) const {
  if (!info_[index]->IsInt32()) WrongType(index, name, "a 32-bit integer");
  return info_[index].As<v8::Int32>()->Value();
}

uint32_t Args::Uint32(int index, const char* name) const {
  if (!info_[index]->IsNumber()) WrongType(index, name, "a number");
  if (!info_[index]->IsUint32()) {
    ThrowRangeError(isolate_, std::string("The \"") + name +
                                  "\" argument must be an unsigned 32-bit integer");
  }
  return info_[index].As<v8::Uint32>()->Value();
}

uint64_t Args::Index(int index, const char* name) const {
  double value = Number(index, name);
  if (!(value >= 0) || value > kMaxSafeInteger || std::trunc(value) != value) {
    ThrowRangeError(isolate_, std::string("The \"") + name +
                                  "\" argument must be a non-negative safe integer");
  }
  return static_cast<uint64_t>(value);
}

double Args::Number(int index, const char* name) const {
  if (!info_[index]->IsNumber()) WrongType(index, name, "a number");
  return info_[index].As<v8::Number>()->Value();
}

bool Args::Bool(int index, const char* name) const {
  if (!info_[index]->IsBoolean()) WrongType(index, name, "a boolean");
  return info_[index].As<v8::Boolean>()->Value();
}

std::string Args::String(int index, const char* name) const {
  if (!info_[index]->IsString()) WrongType(index, name, "a string");
  v8::String::Utf8Value utf8(isolate_, info_[index]);
  std::string text(*utf8, utf8.length());
  if (text.find('\0') != std::string::npos) WrongType(index, name, "a string without NUL");
  return text;
}

Local<v8::Uint8Array> Args::Bytes(int index, const char* name) const {
  if (!info_[index]->IsUint8Array()) WrongType(index, name, "a Uint8Array");
  return info_[index].As<v8::Uint8Array>();
}

Local<v8::SharedArrayBuffer> Args::Shared(int index, const char* name) const {
  if (!info_[index]->IsSharedArrayBuffer()) WrongType(index, name, "a SharedArrayBuffer");
  return info_[index].As<v8::SharedArrayBuffer>();
}

Local<v8::Array> Args::Array(int index, const char* name) const {
  if (!info_[index]->IsArray()) WrongType(index, name, "an array");
  return info_[index].As<v8::Array>();
}

Local<v8::Function> Args::Function(int index, const char* name) const {
  if (!info_[index]->IsFunction()) WrongType(index, name, "a function");
  return info_[index].As<v8::Function>();
}

}  // namespace vrdma

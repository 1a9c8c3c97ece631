// Shared memory: memfds, MAP_SHARED mappings exposed as SharedArrayBuffers,
// and a bounds-checked memmove between byte arrays.

#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

#include "addon.h"
#include "js.h"

namespace vrdma {

namespace {

using v8::Isolate;
using v8::Local;

struct Mapping {
  size_t size;  // bytes visible to JS
  size_t span;  // bytes reserved in the address space (whole pages)
  int prot;
  bool live;  // still backed by the file (munmap() not called yet)
};

// Every mapping made by mmap(), keyed by address, from creation until V8
// frees its backing store. The backing store deleter may run on any thread
// (a worker may hold the last reference, or V8 may free it in the
// background), hence the lock.
class MappingRegistry {
 public:
  enum class UnmapResult { kUnmapped, kUnknown, kAlreadyUnmapped, kFailed };

  void Add(void* addr, const Mapping& mapping) {
    std::lock_guard<std::mutex> hold(lock_);
    mappings_[addr] = mapping;
    liveCount_++;
    liveBytes_ += mapping.size;
  }

  // Swaps the file pages for anonymous zero pages at the same address, so
  // the SharedArrayBuffer stays readable while the file is released. Done
  // under the lock so two threads cannot both unmap the same buffer.
  UnmapResult Unmap(void* addr, int* err) {
    std::lock_guard<std::mutex> hold(lock_);
    auto it = mappings_.find(addr);
    if (it == mappings_.end()) return UnmapResult::kUnknown;
    Mapping& mapping = it->second;
    if (!mapping.live) return UnmapResult::kAlreadyUnmapped;
    void* zeros = ::mmap(addr, mapping.span, mapping.prot,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (zeros == MAP_FAILED) {
      *err = errno;
      return UnmapResult::kFailed;
    }
    MarkDead(mapping);
    return UnmapResult::kUnmapped;
  }

  // Forgets a mapping whose backing store is being freed; returns the span
  // to hand back to the system (0 if the address is unknown).
  size_t Forget(void* addr) {
    std::lock_guard<std::mutex> hold(lock_);
    auto it = mappings_.find(addr);
    if (it == mappings_.end()) return 0;
    size_t span = it->second.span;
    if (it->second.live) MarkDead(it->second);
    mappings_.erase(it);
    return span;
  }

  void Stats(double* count, double* bytes) {
    std::lock_guard<std::mutex> hold(lock_);
    *count = static_cast<double>(liveCount_);
    *bytes = static_cast<double>(liveBytes_);
  }

 private:
  void MarkDead(Mapping& mapping) {
    mapping.live = false;
    liveCount_--;
    liveBytes_ -= mapping.size;
  }

  std::mutex lock_;
  std::unordered_map<void*, Mapping> mappings_;
  size_t liveCount_ = 0;
  size_t liveBytes_ = 0;
};

MappingRegistry& Registry() {
  // Never destroyed: V8 may free backing stores after static destructors
  // have run at exit.
  static MappingRegistry* registry = new MappingRegistry();
  return *registry;
}

// The backing store deleter: runs once V8 has no more references, whether
// or not JS called munmap().
void ReleaseMapping(void* addr, size_t, void*) {
  size_t span = Registry().Forget(addr);
  if (span != 0) ::munmap(addr, span);
}

size_t PageSize() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// hugetlbfs files map in huge pages: offsets and unmapped ranges must be
// multiples of the huge page size, which fstatfs reports as f_bsize.
size_t MappingGranule(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) == 0 && fs.f_type == HUGETLBFS_MAGIC) return static_cast<size_t>(fs.f_bsize);
  return PageSize();
}

uint64_t FileSize(Isolate* isolate, int fd) {
  struct stat st;
  if (fstat(fd, &st) < 0) ThrowSysError(isolate, "fstat", errno);
  return static_cast<uint64_t>(st.st_size);
}

void MemfdCreate(const Args& args) {
  std::string name = args.String(0, "name");
  uint64_t size = args.Index(1, "size");
  UniqueFd fd(memfd_create(name.c_str(), MFD_CLOEXEC));
  if (fd.get() < 0) ThrowSysError(args.isolate(), "memfd_create", errno);
  if (ftruncate(fd.get(), static_cast<off_t>(size)) < 0) {
    ThrowSysError(args.isolate(), "ftruncate", errno);
  }
  args.Return(fd.release());
}

void FdSize(const Args& args) {
  int fd = args.Fd(0, "fd");
  args.Return(static_cast<double>(FileSize(args.isolate(), fd)));
}

void CheckMappable(Isolate* isolate, int fd, uint64_t offset, uint64_t size, size_t granule) {
  if (size == 0) ThrowSysError(isolate, "mmap", EINVAL, "of 0 bytes");
  if (offset % granule != 0) {
    ThrowSysError(isolate, "mmap", EINVAL,
                  "at offset " + std::to_string(offset) + " (not a multiple of the " +
                      std::to_string(granule) + "-byte page size)");
  }
  // Touching a page past the end of the file raises SIGBUS, which would kill
  // the process long after this call returned: refuse such a mapping now.
  uint64_t fileSize = FileSize(isolate, fd);
  if (offset > fileSize || size > fileSize - offset) {
    ThrowSysError(isolate, "mmap", ERANGE,
                  "of " + std::to_string(size) + " bytes at offset " + std::to_string(offset) +
                      " runs past the end of the " + std::to_string(fileSize) + "-byte file");
  }
}

void Mmap(const Args& args) {
  int fd = args.Fd(0, "fd");
  uint64_t offset = args.Index(1, "offset");
  uint64_t size = args.Index(2, "size");
  bool writable = args.Bool(3, "writable");
  size_t granule = MappingGranule(fd);
  CheckMappable(args.isolate(), fd, offset, size, granule);

  size_t span = (size + granule - 1) / granule * granule;
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* addr = ::mmap(nullptr, span, prot, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (addr == MAP_FAILED) ThrowSysError(args.isolate(), "mmap", errno);
  Registry().Add(addr, Mapping{size, span, prot, true});

  // N-API cannot wrap external memory in a SharedArrayBuffer; V8 can.
  std::shared_ptr<v8::BackingStore> store =
      v8::SharedArrayBuffer::NewBackingStore(addr, size, ReleaseMapping, nullptr);
  args.Return(v8::SharedArrayBuffer::New(args.isolate(), std::move(store)));
}

void Munmap(const Args& args) {
  Local<v8::SharedArrayBuffer> buffer = args.Shared(0, "buffer");
  int err = 0;
  switch (Registry().Unmap(buffer->Data(), &err)) {
    case MappingRegistry::UnmapResult::kUnmapped:
      return;
    case MappingRegistry::UnmapResult::kUnknown:
      ThrowSysError(args.isolate(), "munmap", EINVAL,
                    "of a SharedArrayBuffer mmap() did not create");
    case MappingRegistry::UnmapResult::kAlreadyUnmapped:
      ThrowSysError(args.isolate(), "munmap", EINVAL, "of a buffer that is already unmapped");
    case MappingRegistry::UnmapResult::kFailed:
      ThrowSysError(args.isolate(), "mmap", err, "(replacing the file pages with zeros)");
  }
}

void MappingStats(const Args& args) {
  Isolate* isolate = args.isolate();
  Local<v8::Context> context = args.context();
  double count = 0;
  double bytes = 0;
  Registry().Stats(&count, &bytes);
  Local<v8::Object> stats = v8::Object::New(isolate);
  stats->Set(context, NewString(isolate, "mappings"), v8::Number::New(isolate, count)).Check();
  stats->Set(context, NewString(isolate, "bytes"), v8::Number::New(isolate, bytes)).Check();
  args.Return(stats);
}

void Copy(const Args& args) {
  Local<v8::Uint8Array> dst = args.Bytes(0, "dst");
  uint64_t dstOffset = args.Index(1, "dstOffset");
  Local<v8::Uint8Array> src = args.Bytes(2, "src");
  uint64_t srcOffset = args.Index(3, "srcOffset");
  uint64_t length = args.Index(4, "length");
  CheckRange(args.isolate(), "copy: dst", dstOffset, length, dst->ByteLength());
  CheckRange(args.isolate(), "copy: src", srcOffset, length, src->ByteLength());
  if (length == 0) return;
  // memmove: dst and src may be views of the same buffer.
  std::memmove(ViewData(dst) + dstOffset, ViewData(src) + srcOffset, length);
}

}  // namespace

void RegisterMemory(Local<v8::Context> context, Local<v8::Object> exports) {
  SetMethod(context, exports, "memfdCreate", Bind<MemfdCreate>);
  SetMethod(context, exports, "fdSize", Bind<FdSize>);
  SetMethod(context, exports, "mmap", Bind<Mmap>);
  SetMethod(context, exports, "munmap", Bind<Munmap>);
  SetMethod(context, exports, "mappingStats", Bind<MappingStats>);
  SetMethod(context, exports, "copy", Bind<Copy>);
}

}  // namespace vrdma

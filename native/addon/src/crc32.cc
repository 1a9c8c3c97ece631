// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) for the soft-RoCE
// ICRC, which covers every byte of every packet sent and received: in
// JavaScript (and in Node's zlib.crc32, which does not use the CPU's
// carry-less multiply) it cost more per 4 KiB packet than the sendmmsg
// that carries it.
//
// crc32Update(crc, buf, offset, length) -> the raw register (no inversion
// on entry or exit, like the kernel's crc32_le()), as the JS crc32Update.
//
// x86 with PCLMULQDQ folds 64 bytes per step. The method, derived here:
// with the message read as a polynomial whose first bit is the highest
// coefficient, a 128-bit block R = Rh·x^64 + Rl moved T bits further on is
// R·x^T ≡ Rh·(x^(T+64) mod P) + Rl·(x^T mod P): two 64×32-bit carry-less
// products, no reduction inside the loop. What is left at the end is a
// 16-byte residue congruent to the whole message, so its CRC (16 table
// steps) is the message's CRC. In the reflected bit order a carry-less
// product comes out one degree low, hence the constants are x^(T+63) and
// x^(T-1) (values at kFold).
// Everything else (short input, other CPUs) takes the byte table.
#include <cstddef>
#include <cstdint>

#include "js.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VRDMA_CRC_CLMUL 1
#endif

namespace vrdma {
namespace {

using v8::Local;

struct Table {
  uint32_t t[256];
  Table() {
    for (uint32_t n = 0; n < 256; n++) {
      uint32_t c = n;
      for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
  }
};
const Table kTable;

uint32_t Bytewise(uint32_t crc, const uint8_t* p, size_t len) {
  for (size_t i = 0; i < len; i++) crc = kTable.t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc;
}

#ifdef VRDMA_CRC_CLMUL
// Lane values: bit i is the coefficient of degree 63 - i. Low lane multiplies
// the block's first 8 bytes (Rh), high lane its last 8 (Rl).
//   fold by 512: x^575, x^511   by 384: x^447, x^383
//   fold by 256: x^319, x^255   by 128: x^191, x^127   (all mod P)
struct Fold {
  uint64_t hi;  // x^(T+63) mod P, applied to Rh
  uint64_t lo;  // x^(T-1) mod P, applied to Rl
};
constexpr Fold kFold512{0x653d982200000000ull, 0xcad38e8f00000000ull};
constexpr Fold kFold384{0x69ccfc0d00000000ull, 0x2a28386200000000ull};
constexpr Fold kFold256{0x9570d49500000000ull, 0x01b5fd1d00000000ull};
constexpr Fold kFold128{0x65673b4600000000ull, 0x9ba54c6f00000000ull};

__attribute__((target("pclmul,sse2"))) inline __m128i Constants(const Fold& f) {
  return _mm_set_epi64x(static_cast<long long>(f.lo), static_cast<long long>(f.hi));
}

// R moved T bits on (T given by the constants k), still 128 bits wide.
__attribute__((target("pclmul,sse2"))) inline __m128i Shift(__m128i r, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(r, k, 0x00), _mm_clmulepi64_si128(r, k, 0x11));
}

__attribute__((target("pclmul,sse2"))) inline __m128i Load(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// len >= 64.
__attribute__((target("pclmul,sse2"))) uint32_t Clmul(uint32_t crc, const uint8_t* p, size_t len) {
  __m128i x0 = _mm_xor_si128(Load(p), _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i x1 = Load(p + 16);
  __m128i x2 = Load(p + 32);
  __m128i x3 = Load(p + 48);
  p += 64;
  len -= 64;
  // Four independent chains so the multiplier's latency overlaps.
  const __m128i k512 = Constants(kFold512);
  while (len >= 64) {
    x0 = _mm_xor_si128(Shift(x0, k512), Load(p));
    x1 = _mm_xor_si128(Shift(x1, k512), Load(p + 16));
    x2 = _mm_xor_si128(Shift(x2, k512), Load(p + 32));
    x3 = _mm_xor_si128(Shift(x3, k512), Load(p + 48));
    p += 64;
    len -= 64;
  }
  __m128i x = _mm_xor_si128(x3, Shift(x0, Constants(kFold384)));
  x = _mm_xor_si128(x, Shift(x1, Constants(kFold256)));
  const __m128i k128 = Constants(kFold128);
  x = _mm_xor_si128(x, Shift(x2, k128));
  while (len >= 16) {
    x = _mm_xor_si128(Shift(x, k128), Load(p));
    p += 16;
    len -= 16;
  }
  alignas(16) uint8_t residue[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(residue), x);
  return Bytewise(Bytewise(0, residue, 16), p, len);
}

// Runs at load time, possibly before libgcc's own CPU probe: ask it to probe first.
bool DetectClmul() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
}
const bool kHaveClmul = DetectClmul();
#endif

uint32_t Crc32(uint32_t crc, const uint8_t* p, size_t len) {
#ifdef VRDMA_CRC_CLMUL
  if (kHaveClmul && len >= 64) return Clmul(crc, p, len);
#endif
  return Bytewise(crc, p, len);
}

// crc32Update(crc, buf, offset, length) -> register after buf[offset, offset + length).
void Crc32Update(const Args& args) {
  uint32_t crc = args.Uint32(0, "crc");
  Local<v8::Uint8Array> buf = args.Bytes(1, "buf");
  uint64_t offset = args.Index(2, "offset");
  uint64_t length = args.Index(3, "length");
  CheckRange(args.isolate(), "crc32Update", offset, length, buf->ByteLength());
  args.Return(static_cast<double>(Crc32(crc, ViewData(buf) + offset, length)));
}

}  // namespace

void RegisterCrc32(Local<v8::Context> context, Local<v8::Object> exports) {
  SetMethod(context, exports, "crc32Update", Bind<Crc32Update>);
}

}  // namespace vrdma

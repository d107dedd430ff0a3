// Instruction-set detection and the SPIKEOPS_CPU_ISA cap (cpu/isa.h; docs/ops.md, spike_linear).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if SPIKEOPS_X86_INTRINSICS
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace spikeops {
namespace cpu {
namespace {

// What the CPU and the OS give this process: the features the kernels of csrc/cpu/ use.
struct Features {
  bool popcnt = false;
  bool avx2 = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vnni = false;
  bool vpopcntdq = false;  // AVX512_VPOPCNTDQ (spike_matmul's vector kernel)
  bool gfni = false;  // GFNI (spike_matmul's byte kernel)
  bool amx = false;  // AMX-TILE and AMX-INT8, tile registers granted
};

#if SPIKEOPS_X86_INTRINSICS
// AMX: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25) and Linux lets this
// process use the tile registers: their 8 KiB of state per thread are saved on context switches
// only for processes that ask, with arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA (a
// tile instruction without that permission faults).
bool amx_granted() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 24) & 1u) || !((edx >> 25) & 1u)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

Features detect() {
  Features f;
#if SPIKEOPS_X86_INTRINSICS
  // __builtin_cpu_supports reads CPUID and, for the vector sets, whether the OS saves their
  // registers (XCR0): a set the OS does not save counts as absent.
  __builtin_cpu_init();
  f.popcnt = __builtin_cpu_supports("popcnt");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.vpopcntdq = f.avx512f && __builtin_cpu_supports("avx512vpopcntdq");
  f.gfni = __builtin_cpu_supports("gfni");
  f.amx = f.avx512f && amx_granted();  // the AMX kernels unpack with AVX-512
#endif
  return f;
}

// Detected once: the CPU does not change, and the AMX request is a system call.
const Features& features() {
  static const Features f = detect();
  return f;
}

// The best level the features allow, each level needing those below it.
Isa supported() {
  const Features& f = features();
  if (!f.avx2 || !f.f16c) return Isa::kGeneric;
  if (!f.avx512f || !f.avx512bw || !f.avx512vnni) return Isa::kAvx2;
  return f.amx ? Isa::kAmx : Isa::kAvx512Vnni;
}

// SPIKEOPS_CPU_ISA, or nullptr when it is unset or empty. Read on every call, so that the tests
// run every path in one process.
const char* isa_cap() {
  const char* cap = std::getenv("SPIKEOPS_CPU_ISA");
  return cap == nullptr || *cap == '\0' ? nullptr : cap;
}

}  // namespace

Isa best_isa() {
  // The cap never enables what the CPU lacks; any other value is refused: a misspelt cap would
  // otherwise record the wrong path in silence.
  const char* cap = isa_cap();
  if (cap == nullptr) return supported();
  for (Isa level : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512Vnni})
    if (std::strcmp(cap, isa_name(level)) == 0) return std::min(supported(), level);
  TORCH_CHECK_VALUE(false, "SPIKEOPS_CPU_ISA must be avx512vnni, avx2 or generic (or unset), "
                    "got '", cap, "'");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool has_popcnt() { return features().popcnt; }

bool has_vpopcntdq() { return features().vpopcntdq && best_isa() >= Isa::kAvx512Vnni; }

bool has_gfni() {
  return features().gfni && supported() >= Isa::kAvx512Vnni && isa_cap() == nullptr;
}

}  // namespace cpu
}  // namespace spikeops

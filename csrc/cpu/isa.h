// The x86 instruction sets of the CPU kernels, in one place: what this CPU and its OS give the
// process (detected once), the cap SPIKEOPS_CPU_ISA puts on it (read on every call), their names,
// and the compiler target attribute of each set. Every ISA-specific function of csrc/cpu/ is
// compiled with one of the SPIKEOPS_TARGET_* attributes below and called only where best_isa()
// (or has_popcnt()) says the CPU has that set (docs/ops.md, spike_linear, the int backend).
#pragma once

// Whether the x86 kernels with intrinsics (GCC's target attributes) are compiled.
#if defined(__x86_64__) && defined(__GNUC__)
#define SPIKEOPS_X86_INTRINSICS 1
#else
#define SPIKEOPS_X86_INTRINSICS 0
#endif

#if SPIKEOPS_X86_INTRINSICS
// The build targets baseline x86-64 (a wheel runs on any x86-64 CPU); these compile one function
// for more. Each level holds the features of the levels below it, as Isa's levels do (AMX unpacks
// weight tiles with AVX-512 instructions), and nothing best_isa() did not check.
#define SPIKEOPS_TARGET_POPCNT __attribute__((target("popcnt")))
#define SPIKEOPS_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define SPIKEOPS_TARGET_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vnni")))
// spike_matmul's vector kernel: 64-bit popcounts of 8 keys at once (VPOPCNTQ).
#define SPIKEOPS_TARGET_VPOPCNTDQ __attribute__((target("popcnt,avx512f,avx512vpopcntdq")))
// spike_matmul's byte kernel: bit planes to bytes by a bit-matrix transpose (GF2P8AFFINEQB).
#define SPIKEOPS_TARGET_GFNI \
  __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vnni,gfni")))
#define SPIKEOPS_TARGET_AMX \
  __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))
#endif

// The portable spike_linear kernel (cpu/linear.cpp) is one source written with GCC vector types,
// not one kernel per set: target_clones compiles it for x86-64-v4 (AVX-512), v3 (AVX2) and the
// baseline, and the loader picks the clone once (an ifunc), so no call pays for a dispatch.
// SPIKEOPS_CPU_ISA does not cap the clones: they are the same source, hence the same integers and
// the same epilogue on every clone (the build passes -ffp-contract=off), which the cap's tests of
// the hand-written kernels could not tell apart. Elsewhere (Clang, other architectures) the
// portable kernel is compiled for the baseline only.
#if SPIKEOPS_X86_INTRINSICS && !defined(__clang__)
#define SPIKEOPS_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPIKEOPS_TARGET_CLONES
#endif

namespace spikeops {
namespace cpu {

// The instruction sets of the int backend on the CPU layout and of the vector encoder, each
// implying those below it: AVX2 with F16C; AVX-512 F, BW and VNNI; AMX-TILE and AMX-INT8 with
// the tile registers granted to the process by Linux.
enum class Isa { kGeneric, kAvx2, kAvx512Vnni, kAmx };

// The best set the CPU has, capped by SPIKEOPS_CPU_ISA=avx512vnni, =avx2 or =generic (never
// raised past what the CPU has); any other value of the variable raises ValueError.
Isa best_isa();

// "amx", "avx512vnni", "avx2" or "generic": the names SPIKEOPS_CPU_ISA and spikeops._C.cpu_isa()
// use.
const char* isa_name(Isa isa);

// Whether the CPU has the popcnt instruction (spike_matmul; not capped: it computes the same
// integers as the library call it replaces).
bool has_popcnt();

// Whether spike_matmul's AVX-512 VPOPCNTDQ kernel runs: the CPU has AVX512F and VPOPCNTDQ, and
// SPIKEOPS_CPU_ISA does not cap the sets below avx512vnni (=avx2 runs the scalar popcount
// kernel: the same integers, which the tests compare).
bool has_vpopcntdq();

// Whether spike_matmul's byte kernel turns B's bit planes into bytes with GFNI (GF2P8AFFINEQB):
// the CPU has GFNI and AVX-512 VNNI (the byte kernel's level) and SPIKEOPS_CPU_ISA is unset.
// GFNI is no level of its own, so any cap turns it off: SPIKEOPS_CPU_ISA=avx512vnni runs the
// byte kernel as on a CPU without GFNI, unpacking plane by plane (the same bytes, which the
// tests compare).
bool has_gfni();

}  // namespace cpu
}  // namespace spikeops

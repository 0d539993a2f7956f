#pragma once
// What the CPU's standard_normal_ (standard_normal_cpu.cpp) draws with, for
// `python -m fusedgauss info`.

namespace fusedgauss {
namespace cpu {

/// The Box-Muller transform of torch's normal_ that standard_normal_ mirrors at torch's CPU
/// capability here, "avx2" or "scalar", or nullptr: none is, and torch's normal_ draws.
const char* mirrored_normal_transform();

}  // namespace cpu
}  // namespace fusedgauss

// Portable kernels: any CPU, any architecture. Compiled without ISA flags.
#include <cstdint>

#include "kernels.h"

namespace fastaccum {
namespace {
#include "hash.h"
#include "vec_scalar.h"
#include "kernels_impl.h"
}  // namespace

const KernelTable kScalarTable = make_table<VecScalar>("scalar");

}  // namespace fastaccum

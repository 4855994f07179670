// The MPI process group (mpi_group.cpp, built when MPI is found), private to lib/dist.
#pragma once

#include <memory>

#include "dilatron/dist.h"

namespace dilatron::dist {

#ifdef DILATRON_WITH_MPI
// Initialises MPI; the group finalises it when it goes.
std::unique_ptr<ProcessGroup> make_mpi_group(const InitOptions& options);
#endif

}  // namespace dilatron::dist

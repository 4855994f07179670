# Dependencies from Debian packages (scripts/install-deps.sh installs them).
find_package(OpenMP REQUIRED)
find_package(HDF5 REQUIRED COMPONENTS C)
if(NOT TARGET hdf5::hdf5)
  add_library(hdf5::hdf5 INTERFACE IMPORTED)
  target_include_directories(hdf5::hdf5 INTERFACE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS})
  target_link_libraries(hdf5::hdf5 INTERFACE ${HDF5_C_LIBRARIES} ${HDF5_LIBRARIES})
  target_compile_definitions(hdf5::hdf5 INTERFACE ${HDF5_C_DEFINITIONS} ${HDF5_DEFINITIONS})
endif()
# The OpenMP build of OpenBLAS shares libgomp's thread pool with dilatron's own kernels; the pthread
# build keeps a second pool whose spinning threads fight OpenMP's for the same cores.
find_path(CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas-openmp x86_64-linux-gnu/openblas-openmp NO_CACHE)
find_library(OPENBLAS_LIBRARY NAMES openblas PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
if(NOT CBLAS_INCLUDE_DIR OR NOT OPENBLAS_LIBRARY)
  message(FATAL_ERROR "OpenBLAS not found (cblas.h: ${CBLAS_INCLUDE_DIR}, library: ${OPENBLAS_LIBRARY}); "
                      "run scripts/install-deps.sh")
endif()

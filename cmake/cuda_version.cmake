# fdsm_cuda_version_problem(<nvcc> <torch_cuda> <out_var>)
#
# Sets <out_var> to why <nvcc> cannot build kernels for a torch built with CUDA <torch_cuda>
# (torch.version.cuda, e.g. "13.0"), or to "" when it can. The CUDA major versions must
# agree: the module links the libcudart.so.<major> of nvcc's toolkit, and with another major
# than torch's it either fails to load or puts two CUDA runtimes into one process. Minor
# versions may differ (CUDA's minor version compatibility).
function(fdsm_cuda_version_problem nvcc torch_cuda out_var)
  execute_process(COMMAND "${nvcc}" --version
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0 OR NOT _out MATCHES "release ([0-9]+)\\.([0-9]+)")
    set(${out_var} "could not read the CUDA version from '${nvcc} --version': ${_out}${_err}"
        PARENT_SCOPE)
    return()
  endif()
  set(_nvcc_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  set(_nvcc_major "${CMAKE_MATCH_1}")
  string(REGEX MATCH "^[0-9]+" _torch_major "${torch_cuda}")
  if(NOT _nvcc_major STREQUAL _torch_major)
    string(CONCAT _problem
           "nvcc (${nvcc}) is CUDA ${_nvcc_version} but torch was built with CUDA ${torch_cuda}: "
           "the module would link libcudart.so.${_nvcc_major} next to torch's "
           "libcudart.so.${_torch_major}. Use a CUDA ${_torch_major}.x toolkit (CUDA_HOME or "
           "CMAKE_CUDA_COMPILER) or a torch built for CUDA ${_nvcc_major}")
    set(${out_var} "${_problem}" PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

// ds_offload: DeepSpeed's CPU Adam kernel (its csrc/adam/cpu_adam_impl.cpp, compiled unchanged beside this
// file with DeepSpeed's own build flags) bound with the GIL released during a step.
//
// Why: DeepSpeed's binding (csrc/adam/cpu_adam.cpp) holds the GIL for the whole update, so a step run in a
// background thread stalls every Python hook of the backward running beside it (~1 ms per 16 MiB span).
// Released, the step overlaps the training thread in the same process: no worker process, no shared memory.
#include "cpu_adam.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("adam_update",
          &ds_adam_step,
          "DeepSpeed CPU Adam update, GIL released",
          pybind11::call_guard<pybind11::gil_scoped_release>());
    m.def("create_adam", &create_adam_optimizer, "DeepSpeed CPU Adam create");
    m.def("destroy_adam", &destroy_adam_optimizer, "DeepSpeed CPU Adam destroy");
}

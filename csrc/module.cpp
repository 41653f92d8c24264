// Importing copa_fast._C loads the shared object, whose static initialisers register the
// copa_fast operators with the dispatcher. It holds no Python bindings: the ops are reached
// through torch.ops.copa_fast.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

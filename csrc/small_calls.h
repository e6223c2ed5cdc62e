// The small-shape entries of csrc/small_calls.cpp, added to mmkernels._C by csrc/module.cpp.
#pragma once
#include <Python.h>

namespace mmkernels {
PyMethodDef* small_call_method_table();
}

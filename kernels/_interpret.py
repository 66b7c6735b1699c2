"""Run a Triton kernel in the Triton interpreter on CPU tensors, in a process where triton
was imported for compilation (TRITON_INTERPRET unset).

TRITON_INTERPRET=1 is read when a function is decorated, so it cannot be switched per call:
the whole test suite runs in one process, where the training tests want the fast PyTorch
path and the kernel tests want the interpreter. Wrapping the kernel in InterpretedFunction
directly is what triton.jit does under TRITON_INTERPRET=1. For the duration of a launch two
gaps of the interpreter are patched:
- triton.language's own @jit helpers (tl.sum, tl.max, …) and ours were built as compiled
  JITFunctions, which refuse to be called from Python, so their call runs their source
  through the interpreter instead, exactly as it would have been built under the variable;
- the interpreter holds bf16 values as their uint16 bit patterns, and its tl.dot multiplies
  those integers (a bf16 queue gave a finite loss of ~4e11 instead of ~5): bf16 operands
  are widened to fp32 first, which is exact and is what the tensor cores compute (fp32
  products and accumulation);
- triton < 3.7 turns a scalar into an index with int() of its one-element 1-d array, which
  numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars": every
  kernel failed under triton 3.6 + numpy 2.5); triton 3.7 squeezes the array first, and so
  does the shim for the older releases (INDEX_SHIM).
"""

import numpy as np
import triton
import triton.runtime.interpreter as _interpreter
from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder, TensorHandle
from triton.runtime.jit import JITFunction
import triton.language as tl


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# whether this triton's interpreter needs its tensor.__index__ replaced under this numpy
INDEX_SHIM = _release(triton.__version__) < (3, 7) and _release(np.__version__) >= (2, 4)

_helpers = {}


def _interpreted_helper_call(self, *args, **kwargs):
    helper = _helpers.get(self.fn)
    if helper is None:
        helper = _helpers[self.fn] = InterpretedFunction(self.fn)
    return helper(*args, **kwargs)


def _widen_bf16(x: TensorHandle) -> TensorHandle:
    if x.dtype.scalar != tl.bfloat16 or x.data.dtype != np.uint16:
        return x
    return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


_interpreter_dot = InterpreterBuilder.create_dot


def _dot_bf16_as_fp32(self, a, b, d, *args):
    return _interpreter_dot(self, _widen_bf16(a), _widen_bf16(b), d, *args)


_patch_lang_tensor = getattr(_interpreter, "_patch_lang_tensor", None)


def _patch_lang_tensor_squeezed(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


class Interpreted:
    """`Interpreted(fn)[grid](*args)` runs the plain kernel function `fn` on CPU tensors."""

    def __init__(self, fn):
        self.kernel = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled_call = JITFunction.__call__
            JITFunction.__call__ = _interpreted_helper_call
            InterpreterBuilder.create_dot = _dot_bf16_as_fp32
            if INDEX_SHIM:
                _interpreter._patch_lang_tensor = _patch_lang_tensor_squeezed
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = compiled_call
                InterpreterBuilder.create_dot = _interpreter_dot
                if INDEX_SHIM:
                    _interpreter._patch_lang_tensor = _patch_lang_tensor
        return launch

"""Run a Triton kernel in the Triton interpreter on CPU tensors, in a process where triton
was imported for compilation (TRITON_INTERPRET unset).

TRITON_INTERPRET=1 is read when a function is decorated, so it cannot be switched per call:
the whole test suite runs in one process, where the training tests want the fast PyTorch
path and the kernel tests want the interpreter. Wrapping the kernel in InterpretedFunction
directly is what triton.jit does under TRITON_INTERPRET=1. The one gap is triton.language's
own @jit helpers (tl.sum, tl.max, …): they were built as compiled JITFunctions, which refuse
to be called from Python, so for the duration of a launch their call runs their source
through the interpreter instead, exactly as it would have been built under the variable.
"""

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_helpers = {}


def _interpreted_helper_call(self, *args, **kwargs):
    helper = _helpers.get(self.fn)
    if helper is None:
        helper = _helpers[self.fn] = InterpretedFunction(self.fn)
    return helper(*args, **kwargs)


class Interpreted:
    """`Interpreted(fn)[grid](*args)` runs the plain kernel function `fn` on CPU tensors."""

    def __init__(self, fn):
        self.kernel = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled_call = JITFunction.__call__
            JITFunction.__call__ = _interpreted_helper_call
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = compiled_call
        return launch

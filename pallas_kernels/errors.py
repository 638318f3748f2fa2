"""The kernels' one error: inputs an entry point cannot take, said in one line that names it."""


class KernelInputError(ValueError):
    """Bad shapes, dtypes or options for a kernel, caught before anything is traced."""

"""Triton kernels of the fusedgauss ops, installed as ``fusedgauss.triton_kernels``.

``_<op>_forward_kernel`` and ``_<op>_backward_kernel`` for each op, their math in the
docstrings; the register-tile linear algebra they share is in :mod:`.linalg`. The launchers
and the ``torch.library.triton_op`` registrations are in ``fusedgauss.triton_ops``. Importing
this package imports triton: set ``TRITON_INTERPRET=1`` before that to run the kernels on CPU
tensors through Triton's interpreter.
"""

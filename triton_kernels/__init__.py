"""Triton kernels of the fusedgauss ops (``_<op>_forward_kernel``, ``_<op>_backward_kernel``)
and their launchers. Installed as ``fusedgauss.triton_kernels``; none exist yet, and
``fusedgauss.backends`` reports the Triton backend as unavailable until they do."""

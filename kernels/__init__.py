"""Triton kernels of entrgi (installed as ``entrgi_kernels``). Triton code only: no
autograd, no model knowledge. ``entrgi.ops`` is the only caller."""

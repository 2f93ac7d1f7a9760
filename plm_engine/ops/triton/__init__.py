"""Triton kernels, one module per op family: jit kernels, launchers, custom-op registration.

Importing a module here imports triton; plm_engine.ops does that lazily, only when the triton backend
is chosen, so `import plm_engine` never needs Triton.
"""

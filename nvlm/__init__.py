"""Thin NVLM-D / NVLM-X / NVLM-H model layer built on the public API of nvlm_kernels (issue 7)."""

"""Triton kernels of ofakd_fast, installed as ofakd_fast.kernels."""

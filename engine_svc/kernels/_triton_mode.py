"""Imported by every Triton kernel module before triton itself: compiled kernels on CUDA, else the interpreter,
or an ImportError naming the fix when triton was imported too early for the interpreter (see __init__)."""
from engine_svc.kernels import choose_interpreter

choose_interpreter(strict=True)

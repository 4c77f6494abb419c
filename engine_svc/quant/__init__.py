"""Weight quantization: the storage formats (int8_format, int4_format), the quantized linear layers that replace
nn.Linear in a loaded model, and the converters from checkpoint layouts (AWQ, GPTQ, GGUF) into those formats.

Formats (the contract every producer and consumer here follows):
- int8, weight-only, per output channel, symmetric: w[n, k] = q[n, k] * scale[n]; q int8 in [-127, 127].
- int4, weight-only, group-wise along the input dimension (group size G divides K):
  w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G]; q in [0, 15], stored two per byte along k
  (byte [n, j] holds k = 2j in its low nibble and k = 2j + 1 in its high nibble). The offset form covers RTN with
  a min (offset = min), AWQ/GPTQ zero points (offset = -zero * scale) and GGUF Q4_0 (offset = -8 * d) and
  Q4_1 (offset = m) exactly.
- fp8 (W8A8): e4m3 weights with one float32 scale per output channel; activations quantized per token at run time.
"""

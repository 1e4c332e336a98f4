// dequantization helpers (placeholder: being written)

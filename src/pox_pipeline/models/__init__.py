"""The architectures (one factory each), the EfficientNet-Lite port and its safe weights reader,
model loading and tracing.
"""

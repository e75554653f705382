"""ctypes bindings to the parts of ggml that llama-cpp-python does not expose."""

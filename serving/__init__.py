"""Triton deployment: model repository generation and the tritonserver launcher."""

"""Reference implementations that tests/ and bench/ check specserve against, kept apart from both:

    float64_forward.py  the llama forward pass in plain float64 (naive_forward)
    ggml_cpu.py         the NumPy backend with every op rounded as ggml's x86 CPU backend rounds it
"""

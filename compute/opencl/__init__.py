"""The OpenCL backend (PyOpenCL): `from compute.opencl.backend import OpenCLBackend, list_devices`.

Importing this package registers the CPU runtimes installed from PyPI with the ICD loader
(compute/opencl/runtime.py) before anything can query a platform.
"""

from compute.opencl import runtime

runtime.register()

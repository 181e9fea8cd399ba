"""The OpenCL backend (PyOpenCL): `from compute.opencl.backend import OpenCLBackend, list_devices`."""

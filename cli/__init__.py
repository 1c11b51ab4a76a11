"""The `zoo` command line, a thin layer over the Python API in `zoo/`."""
